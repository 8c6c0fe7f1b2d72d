"""MoE kernels: grouped matmul over experts, and token permute / unpermute.

Conventions (shared by every implementation):
- grouped_matmul(x [T, K], weights [E, K, N] or E tensors [K, N], tokens_per_expert [E]) -> [T, N]:
  rows of x are sorted by expert; rows start..start+n_e go through weights[e]. sum(tokens_per_expert) == T.
- permute(tokens [T, H], indices [T, topk]) -> (permuted [T*topk, H], sorted_indices [T*topk]):
  rows grouped by expert id, stable (token order inside an expert). sorted_indices follows
  torch_npu.npu_moe_token_permute: sorted_indices[t*topk + k] is the output row of (token t, choice k),
  i.e. argsort(argsort(indices.flatten())).
- unpermute(permuted [T*topk, H], sorted_indices, probs [T, topk]) -> [T, H]:
  out[t] = sum_k probs[t, k] * permuted[sorted_indices[t*topk + k]]; the sum runs in fp32.
"""

from __future__ import annotations

import torch


def count_tokens_per_expert(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 counts of routed (token, choice) pairs per expert; stays on the device (no host sync)."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts)


def _check_grouped_args(x, weights, tokens_per_expert):
    num_experts = len(weights)
    if x.dim() != 2:
        raise ValueError(f"grouped_matmul: x must be [tokens, K], got {tuple(x.shape)}")
    if tokens_per_expert.dim() != 1 or tokens_per_expert.numel() != num_experts:
        raise ValueError(
            f"grouped_matmul: tokens_per_expert {tuple(tokens_per_expert.shape)} must be [{num_experts}] "
            f"(one count per expert weight)"
        )
    k = weights[0].shape[-2]
    if x.shape[1] != k:
        raise ValueError(f"grouped_matmul: x {tuple(x.shape)} and expert weights [.., {k}, N] disagree on K")


def grouped_matmul(x: torch.Tensor, weights, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert (reads the counts on the host)."""
    _check_grouped_args(x, weights, tokens_per_expert)
    counts = [int(n) for n in tokens_per_expert.tolist()]
    if sum(counts) != x.shape[0]:
        raise ValueError(
            f"grouped_matmul: tokens_per_expert sums to {sum(counts)} but x has {x.shape[0]} rows"
        )
    outs = [chunk @ weights[e] for e, chunk in enumerate(torch.split(x, counts))]
    return torch.cat(outs, dim=0)


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming grad contiguous: torch._grouped_mm's backward rejects
    the stride-0 grads that e.g. `.sum()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


_GROUPED_MM_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


def grouped_mm_supports(x: torch.Tensor, w: torch.Tensor) -> bool:
    """What torch._grouped_mm accepts: its dtypes per device, and rows of x / w 16-byte aligned."""
    if x.dtype not in _GROUPED_MM_DTYPES.get(x.device.type, ()) or w.dtype != x.dtype:
        return False
    esize = x.element_size()
    return (x.shape[1] * esize) % 16 == 0 and (w.shape[-1] * esize) % 16 == 0


def grouped_matmul_grouped_mm(x: torch.Tensor, weights, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm with cumulative int32 offsets; no host sync. Falls back to the loop for dtypes or
    shapes the kernel does not take (e.g. fp32 on cuda), so correctness never depends on the fast path."""
    _check_grouped_args(x, weights, tokens_per_expert)
    w = weights if isinstance(weights, torch.Tensor) else torch.stack(list(weights))
    if not grouped_mm_supports(x, w):
        return grouped_matmul(x, weights, tokens_per_expert)
    offs = tokens_per_expert.to(device=x.device, dtype=torch.int32, non_blocking=True).cumsum(0, dtype=torch.int32)
    out = torch._grouped_mm(x.contiguous(), w.contiguous(), offs=offs)
    return _ContiguousGrad.apply(out)


def permute(tokens: torch.Tensor, indices: torch.Tensor):
    """Reference permute (see module docstring). Returns (permuted_tokens, sorted_indices int32)."""
    if tokens.dim() != 2:
        raise ValueError(f"permute: tokens must be [tokens, hidden], got {tuple(tokens.shape)}")
    topk = 1 if indices.dim() == 1 else indices.shape[1]
    if indices.shape[0] != tokens.shape[0]:
        raise ValueError(f"permute: indices {tuple(indices.shape)} and tokens {tuple(tokens.shape)} differ in rows")
    order = torch.argsort(indices.reshape(-1), stable=True)  # output row r holds flattened slot order[r]
    permuted = tokens.index_select(0, order // topk)
    sorted_indices = torch.empty_like(order)
    sorted_indices[order] = torch.arange(order.numel(), device=order.device)
    return permuted, sorted_indices.to(torch.int32)


def unpermute(permuted_tokens: torch.Tensor, sorted_indices: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Reference unpermute: gather each (token, choice) row back and sum over choices weighted by probs."""
    if probs.dim() != 2 or probs.numel() != sorted_indices.numel():
        raise ValueError(
            f"unpermute: probs {tuple(probs.shape)} must be [tokens, topk] with tokens*topk == "
            f"{sorted_indices.numel()} (len(sorted_indices))"
        )
    num_tokens, topk = probs.shape
    rows = permuted_tokens.index_select(0, sorted_indices.long()).view(num_tokens, topk, -1)
    out = (rows.float() * probs.float().unsqueeze(-1)).sum(dim=1)
    return out.to(permuted_tokens.dtype)
