"""Cross entropy over vocab-parallel logits: cross_entropy(logits [s, b, V/tp], labels [s, b], tp_group) -> [s, b].

Reference: megatron-core's `vocab_parallel_cross_entropy` (the engine's own; it keeps the fp32 softmax of the
whole [tokens, vocab] block for the backward and walks it several times).

Fused: one pass over the logits in the forward and one in the backward, math in fp32, nothing of logits' size
kept but the logits themselves (which the output layer produced anyway):
  forward   per row: local max m_r, sum of exp(x - m_r), and the label's logit if this rank holds it;
            across TP ranks: M = max m_r, S = sum_r s_r exp(m_r - M)  (two small all-reduces), lse = M + log S;
            loss = lse - x[label]
  backward  grad = (exp(x - lse) - onehot(label)) * dloss per row, written once in the logits' dtype.
(An earlier version wrote softmax - onehot in the forward and scaled it in the backward: one more read and write
of a logits-sized tensor per micro-batch, and wasted work in forward-only evaluation.)
The passes are plain torch here (cpu, npu); ops/cuda.py compiles the same functions into fused kernels.
A label outside this rank's vocab slice contributes no logit on this rank, as in megatron's version.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Reference: megatron-core's vocab-parallel cross entropy (its TP group is the model's)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def _row_stats(x: torch.Tensor, labels: torch.Tensor, vocab_start: int):
    """[N, V] logits -> (row max, sum of exp(x - max), label logit or 0), all fp32 [N]."""
    xf = x.float()
    m = xf.amax(dim=-1)
    s = torch.exp(xf - m.unsqueeze(-1)).sum(dim=-1)
    local = labels - vocab_start
    held = (local >= 0) & (local < x.shape[-1])
    t = xf.gather(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return m, s, torch.where(held, t, torch.zeros_like(t))


def _logits_grad(x: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, vocab_start: int, dloss: torch.Tensor):
    """d(loss)/d(logits) = (softmax - onehot(label)) * dloss per row, computed in fp32, in the logits' dtype."""
    p = torch.exp(x.float() - lse.unsqueeze(-1))
    cols = torch.arange(x.shape[-1], device=x.device) + vocab_start
    onehot = (cols.unsqueeze(0) == labels.unsqueeze(-1)).float()
    return ((p - onehot) * dloss.float().unsqueeze(-1)).to(x.dtype)


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tp_group, passes):
        row_stats, logits_grad = passes
        shape = labels.shape
        x = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1)
        tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        vocab_start = (0 if tp == 1 else dist.get_rank(tp_group)) * x.shape[-1]
        m, s, t = row_stats(x, flat_labels, vocab_start)
        if tp > 1:
            big_m = m.clone()
            dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=tp_group)
            st = torch.stack([s * torch.exp(m - big_m), t])
            dist.all_reduce(st, group=tp_group)
            m, (s, t) = big_m, st
        lse = m + torch.log(s)
        ctx.save_for_backward(logits, lse, flat_labels)
        ctx.logits_grad = logits_grad
        ctx.vocab_start = vocab_start
        return (lse - t).view(shape)

    @staticmethod
    def backward(ctx, dloss):
        logits, lse, flat_labels = ctx.saved_tensors
        x = logits.reshape(-1, logits.shape[-1])
        grad = ctx.logits_grad(x, lse, flat_labels, ctx.vocab_start, dloss.reshape(-1))
        return grad.view(logits.shape), None, None, None


EAGER_PASSES = (_row_stats, _logits_grad)


def fused_cross_entropy(logits, labels, tp_group=None, passes: tuple[Callable, ...] = EAGER_PASSES):
    """The fused cross entropy (see the module docstring); `passes` lets cuda compile its two steps."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
    return _FusedCrossEntropy.apply(logits, labels, tp_group, passes)
