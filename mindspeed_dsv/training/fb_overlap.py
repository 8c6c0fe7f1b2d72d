"""--moe-fb-overlap: run one micro-batch's forward together with another's backward (DeepSeek's DualPipe "F&B").

The two are coroutines: the forward runs on the caller's thread, the backward on a helper thread, and they hand
control to each other at the expert all-to-alls (`models.comm_points`): one side starts its all-to-all, the other
computes, then the first waits for its transfer. Only one side runs at a time, so each computes exactly what it
computes alone (same kernels, same order within a micro-batch): the numbers do not change. What changes is the
order of operations, F and B interleaved at every all-to-all, which lets NCCL move one micro-batch's tokens while
the other's experts run.

The helper thread takes the caller's accelerator device and stream (both are per-thread in torch).
"""

from __future__ import annotations

import threading
from typing import Callable

from mindspeed_dsv.models import comm_points


def _thread_device_setup() -> Callable[[], None]:
    """What the helper thread must set to run where the caller runs: the current accelerator device and stream."""
    import torch

    for name in ("cuda", "npu"):
        mod = getattr(torch, name, None)
        if mod is not None and hasattr(mod, "is_initialized") and mod.is_initialized():
            device, stream = mod.current_device(), mod.current_stream()

            def setup(mod=mod, device=device, stream=stream):
                mod.set_device(device)
                mod.set_stream(stream)

            return setup
    return lambda: None


def run_pair(forward: Callable[[], None], backward: Callable[[], None]) -> None:
    """forward() and backward(), handing over at every expert all-to-all; forward first. Raises what either
    raised (`comm_points.recording` shows the hand-overs)."""
    pair = comm_points.Pair()
    setup = _thread_device_setup()
    errors: list[BaseException] = []

    def backward_side():
        error = None
        try:
            setup()
            pair.wait_turn("B")
            backward()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            error = e
            errors.append(e)
        finally:
            pair.finish("B", error)

    comm_points.activate(pair)
    helper = threading.Thread(target=backward_side, name="moe-fb-overlap-backward", daemon=True)
    helper.start()
    try:
        error = None
        try:
            forward()
        except BaseException as e:
            error = e
            raise
        finally:
            pair.finish("F", error)
            helper.join()
    finally:
        comm_points.activate(None)
    if errors:
        raise errors[0]
