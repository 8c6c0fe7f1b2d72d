"""The expert all-to-all, and the points where an overlapped forward and backward hand control to each other.

`AllToAllTokenDispatcher` sends its rows through `all_to_all` here (the same collective as megatron-core's
`all_to_all`, forward and backward, so the numbers are the same bit for bit). Under --moe-fb-overlap the dualpipev
schedule runs one micro-batch's forward and another's backward as a `Pair` (training/fb_overlap.py): the forward
on the caller's thread, the backward on a helper thread, only one of them running at a time. Each all-to-all,
forward or backward, is started asynchronously, control passes to the other side until that side reaches its
own all-to-all (or finishes), and only then is the transfer waited for: on NCCL it runs while the other
micro-batch computes (DeepSeek's DualPipe). Outside a pair the all-to-all is started and waited for at once.

Which side an all-to-all belongs to is read from autograd, not from the thread: a backward pass (on CUDA autograd
runs it on its own device thread) has a current graph task, a forward has none, also when activation recompute
runs a forward inside a backward.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist


class Pair:
    """Turn-taking between a forward ("F") and a backward ("B"); the forward runs first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._turn = "F"
        self._done = {"F": False, "B": False}
        self._error: BaseException | None = None

    def switch(self, side: str, name: str) -> None:
        """`side` reached a hand-over point: let the other side run until it hands back (or has finished)."""
        if _record is not None:
            _record.append((side, name))
        other = "B" if side == "F" else "F"
        with self._cond:
            if self._done[other]:
                return
            self._turn = other
            self._cond.notify_all()
        self.wait_turn(side)

    def wait_turn(self, side: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == side or self._error is not None)
            if self._error is not None:
                raise RuntimeError("--moe-fb-overlap: the overlapped micro-batch failed") from self._error

    def finish(self, side: str, error: BaseException | None = None) -> None:
        """`side` returned (or raised `error`): the other side runs to its end without handing back."""
        with self._cond:
            self._done[side] = True
            if error is not None and self._error is None:
                self._error = error
            self._turn = "B" if side == "F" else "F"
            self._cond.notify_all()


_active: Pair | None = None
_record: list | None = None


def activate(pair: Pair | None) -> None:
    """Make `pair` the one the all-to-alls hand over in (None: no pair, all-to-alls wait at once)."""
    global _active
    _active = pair
    if _record is not None:
        _record.append(("pair", "start" if pair is not None else "end"))


@contextmanager
def recording():
    """Yields a list that receives, in order, ("pair", "start"/"end") around each overlapped pair and
    (side, "dispatch"/"combine") at each hand-over: the interleaving a test can check."""
    global _record
    _record = []
    try:
        yield _record
    finally:
        _record = None


def _side() -> str:
    return "B" if torch._C._current_graph_task_id() != -1 else "F"


def _exchange(group, x: torch.Tensor, output_splits, input_splits, name: str) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, output_split_sizes=output_splits, input_split_sizes=input_splits,
                                  group=group, async_op=True)
    pair = _active
    if pair is not None:
        pair.switch(_side(), name)
    work.wait()
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x, output_splits, input_splits, name):
        ctx.group, ctx.splits, ctx.name = group, (output_splits, input_splits), name
        return _exchange(group, x, output_splits, input_splits, name)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return None, _exchange(ctx.group, grad, input_splits, output_splits, ctx.name), None, None, None


def all_to_all(group, x: torch.Tensor, output_splits: list[int], input_splits: list[int], name: str) -> torch.Tensor:
    """Rows of `x` split by `input_splits` to the ranks of `group`, received as `output_splits`; differentiable.
    `name` names the hand-over point ("dispatch" / "combine") in a recorded `Pair`."""
    if group.size() == 1:
        return x
    return _AllToAll.apply(group, x, output_splits, input_splits, name)
