"""Run a function on N gloo ranks from inside pytest and collect what each rank returns (see
mindspeed_dsv.platform.spawn). Ranks run on the cpu, single-threaded, without torch.compile."""

from __future__ import annotations

import os

from mindspeed_dsv.platform.spawn import spawn_ranks


def run_distributed(fn, world_size: int, *args, timeout: float = 300, **kwargs) -> list:
    """Returns [result of rank 0, result of rank 1, ...]; raises RankError (a RuntimeError) if any rank failed."""
    env = dict(MINDSPEED_DSV_DEVICE=os.environ.get("MINDSPEED_DSV_DEVICE", "cpu"), TORCHDYNAMO_DISABLE="1",
               OMP_NUM_THREADS="1")
    return spawn_ranks(fn, world_size, *args, env=env, timeout=timeout, **kwargs)
