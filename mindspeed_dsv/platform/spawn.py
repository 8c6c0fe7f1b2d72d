"""Start N local ranks of one function, the way torchrun would, and collect what each returns.

Used where a command or a test must run a multi-rank layout without a launcher (`ckpt_convert verify`, the test
suite). Each rank is a fresh spawned process with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set, so
megatron's global parallel state never leaks between runs. `fn` must be importable and its arguments and return
value picklable.
"""

from __future__ import annotations

import os
import socket
import traceback


class RankError(RuntimeError):
    """One or more ranks failed; the message holds each failing rank's error (a traceback unless ValueError)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, env, fn, args, kwargs, queue):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from mindspeed_dsv.platform import destroy_distributed

    try:
        queue.put((rank, True, fn(*args, **kwargs)))
    except BaseException as e:  # noqa: BLE001 - the parent raises it with the rank named
        # Our ValueErrors already say what is wrong; anything else needs its traceback.
        queue.put((rank, False, str(e) if isinstance(e, ValueError) else traceback.format_exc()))
    finally:
        destroy_distributed()


def spawn_ranks(fn, world_size: int, *args, env: dict | None = None, timeout: float = 600,
                start_method: str = "spawn", **kwargs) -> list:
    """[result of rank 0, result of rank 1, ...]; raises RankError naming every rank that failed.
    start_method "forkserver" forks each rank from multiprocessing's fork server instead of starting a fresh
    interpreter (fast when its preload list holds torch and megatron; the server itself never runs a rank, so no
    parallel state leaks either way)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, dict(env or {}), fn, args, kwargs, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RankError("\n".join(sorted(errors)))
    return [results[r] for r in range(world_size)]
