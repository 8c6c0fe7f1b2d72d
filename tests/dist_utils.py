"""Run a function on N gloo ranks from inside pytest and collect what each rank returns.

Each rank is a fresh spawned process (so megatron's global parallel state never leaks between tests) with
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set the way torchrun sets them. `fn` must be importable
(a module-level function) and its arguments and return value picklable.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, kwargs, queue):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        MINDSPEED_DSV_DEVICE=os.environ.get("MINDSPEED_DSV_DEVICE", "cpu"),
        TORCHDYNAMO_DISABLE="1",
        OMP_NUM_THREADS="1",
    )
    try:
        result = fn(*args, **kwargs)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        from mindspeed_dsv.platform import destroy_distributed

        destroy_distributed()


def run_distributed(fn, world_size: int, *args, timeout: float = 300, **kwargs) -> list:
    """Returns [result of rank 0, result of rank 1, ...]; raises if any rank failed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, kwargs, queue))
        for r in range(world_size)
    ]
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
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
