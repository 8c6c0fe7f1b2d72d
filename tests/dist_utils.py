"""Run a function on N gloo ranks from inside pytest and collect what each rank returns (see
mindspeed_dsv.platform.spawn). Ranks run on the cpu, single-threaded, without torch.compile.

On the cpu the ranks are forked from one fork server that imported torch, megatron-core and transformers once
(about 3 s of imports saved per launch, most of a tiny run). The server only imports, so each rank still starts
without any parallel state (torch's rng at its import-time default, as in a fresh interpreter). Other devices
(the emulated NPU installs its fake torch_npu before megatron is imported) get freshly spawned interpreters."""

from __future__ import annotations

import multiprocessing
import os

from mindspeed_dsv.platform.spawn import spawn_ranks

PRELOAD = ["torch", "megatron.core", "transformers"]
_ENV = dict(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
_server_started = False


def fork_server_context():
    """The forkserver multiprocessing context, its server started (test_crash forks its writers from it too)."""
    _start_fork_server()
    return multiprocessing.get_context("forkserver")


def _start_fork_server():
    """Start the fork server once, with the ranks' import-time environment (torch reads these at import)."""
    global _server_started
    if _server_started:
        return
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)
    try:
        forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    _server_started = True


_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _in_environ(environ: dict, fn, *args, **kwargs):
    """Rank side: the test process's environment exactly (a forked rank would otherwise see the fork server's, from
    before a test's monkeypatch.setenv), the launch variables spawn_ranks set kept; then fn."""
    launch = {k: os.environ[k] for k in _LAUNCH_VARS}
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(launch)
    return fn(*args, **kwargs)


def run_distributed(fn, world_size: int, *args, timeout: float = 300, **kwargs) -> list:
    """Returns [result of rank 0, result of rank 1, ...]; raises RankError (a RuntimeError) if any rank failed."""
    device = os.environ.get("MINDSPEED_DSV_DEVICE", "cpu")
    env = dict(MINDSPEED_DSV_DEVICE=device, **_ENV)
    if device != "cpu":
        return spawn_ranks(fn, world_size, *args, env=env, timeout=timeout, **kwargs)
    _start_fork_server()
    return spawn_ranks(_in_environ, world_size, {**os.environ, **env}, fn, *args, env=env, timeout=timeout,
                       start_method="forkserver", **kwargs)
