"""MoE kernels: grouped matmul over experts, and token permute / unpermute.

Conventions (shared by every implementation):
- grouped_matmul(x [T, K], weights [E, K, N] or E tensors [K, N], tokens_per_expert [E]) -> [T, N]:
  rows of x are sorted by expert; rows start..start+n_e go through weights[e]. sum(tokens_per_expert) == T.
- permute(tokens [T, H], indices [T, topk] of any integer dtype) -> (permuted [T*topk, H], sorted_indices [T*topk]):
  rows grouped by expert id, stable (token order inside an expert). sorted_indices follows
  torch_npu.npu_moe_token_permute: sorted_indices[t*topk + k] is the output row of (token t, choice k),
  i.e. argsort(argsort(indices.flatten())).
- unpermute(permuted [T*topk, H], sorted_indices, probs [T, topk]) -> [T, H]:
  out[t] = sum_k probs[t, k] * permuted[sorted_indices[t*topk + k]]; the sum runs in fp32.
"""

from __future__ import annotations

import torch


def count_tokens_per_expert(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 counts of routed (token, choice) pairs per expert; stays on the device (no host sync: a
    scatter_add, where CUDA's bincount would read the input's max on the host)."""
    flat = indices.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def routed_experts(routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """[tokens, topk] int64: each token's experts from megatron's [tokens, experts] routing map, in increasing id,
    filled (if a row has fewer than topk set) with unset experts in increasing id: what a stable descending argsort
    of the map gives, from one top-k over distinct keys instead of a segmented sort (tens of kernel launches)."""
    n = routing_map.shape[1]
    ids = torch.arange(n, device=routing_map.device, dtype=torch.int32)
    return torch.where(routing_map, 2 * n - ids, n - ids).topk(topk, dim=1).indices


def sort_keys(indices: torch.Tensor, num_values: int) -> torch.Tensor:
    """indices (all below num_values) in the narrowest integer dtype that holds them, for `permute`: its stable
    radix sort makes one pass per key byte (eight for int64)."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if num_values - 1 <= torch.iinfo(dtype).max:
            return indices.to(dtype)
    return indices


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


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least fp32 (bf16/fp16 rows are summed in fp32, fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


class _Permute(torch.autograd.Function):
    """Rows gathered by expert. Backward gathers each token's k gradient rows back and sums them in fp32: the
    autograd of index_select would scatter-add them with atomics (bf16 atomics: ~6x slower on H200)."""

    @staticmethod
    def forward(ctx, tokens, indices):
        topk = 1 if indices.dim() == 1 else indices.shape[1]
        order = torch.argsort(indices.reshape(-1), stable=True)  # output row r holds flattened slot order[r]
        permuted = tokens.index_select(0, order // topk)
        sorted_indices = torch.empty_like(order)
        sorted_indices[order] = torch.arange(order.numel(), device=order.device)
        ctx.save_for_backward(sorted_indices)
        ctx.topk = topk
        sorted_indices = sorted_indices.to(torch.int32)
        ctx.mark_non_differentiable(sorted_indices)
        return permuted, sorted_indices

    @staticmethod
    def backward(ctx, grad_permuted, _grad_indices):
        (sorted_indices,) = ctx.saved_tensors
        rows = grad_permuted.index_select(0, sorted_indices).view(-1, ctx.topk, grad_permuted.shape[-1])
        return rows.sum(dim=1, dtype=_acc(grad_permuted.dtype)).to(grad_permuted.dtype), None


class _Unpermute(torch.autograd.Function):
    """out[t] = sum_k probs[t, k] * permuted[sorted_indices[t*k + k']] in fp32. Saves the (bf16) permuted rows,
    not the fp32 products; backward writes each row's gradient once (unique indices: no atomics)."""

    @staticmethod
    def forward(ctx, permuted_tokens, sorted_indices, probs):
        num_tokens, topk = probs.shape
        index = sorted_indices.long()
        rows = permuted_tokens.index_select(0, index).view(num_tokens, topk, permuted_tokens.shape[-1])
        acc = _acc(permuted_tokens.dtype)
        out = (rows.to(acc) * probs.to(acc).unsqueeze(-1)).sum(dim=1)
        ctx.save_for_backward(permuted_tokens, index, probs)
        return out.to(permuted_tokens.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        permuted_tokens, index, probs = ctx.saved_tensors
        num_tokens, topk = probs.shape
        acc = _acc(permuted_tokens.dtype)
        grad_probs = None
        if ctx.needs_input_grad[2]:
            rows = permuted_tokens.index_select(0, index).view(num_tokens, topk, permuted_tokens.shape[-1])
            grad_probs = (rows.to(acc) * grad_out.to(acc).unsqueeze(1)).sum(dim=-1).to(probs.dtype)
        grad_rows = (grad_out.to(acc).unsqueeze(1) * probs.to(acc).unsqueeze(-1)).to(permuted_tokens.dtype)
        grad_permuted = torch.empty_like(permuted_tokens).index_copy_(
            0, index, grad_rows.view(num_tokens * topk, permuted_tokens.shape[-1])
        )
        return grad_permuted, None, grad_probs


def permute(tokens: torch.Tensor, indices: torch.Tensor):
    """Reference permute (see module docstring). Returns (permuted_tokens, sorted_indices int32)."""
    if tokens.dim() != 2:
        raise ValueError(f"permute: tokens must be [tokens, hidden], got {tuple(tokens.shape)}")
    if indices.shape[0] != tokens.shape[0]:
        raise ValueError(f"permute: indices {tuple(indices.shape)} and tokens {tuple(tokens.shape)} differ in rows")
    return _Permute.apply(tokens, indices)


def unpermute(permuted_tokens: torch.Tensor, sorted_indices: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Reference unpermute: gather each (token, choice) row back and sum over choices weighted by probs."""
    if probs.dim() != 2 or probs.numel() != sorted_indices.numel():
        raise ValueError(
            f"unpermute: probs {tuple(probs.shape)} must be [tokens, topk] with tokens*topk == "
            f"{sorted_indices.numel()} (len(sorted_indices))"
        )
    return _Unpermute.apply(permuted_tokens, sorted_indices, probs)


def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def grouped_wgrad_kernel(main_grad: torch.Tensor) -> str:
    """Which kernel adds the experts' weight gradient into `main_grad`: 'triton' (CUDA with Triton, one grouped
    GEMM accumulating in fp32, ops/triton_wgrad.py) or 'torch' (one fp32 matmul per expert, then add)."""
    return "triton" if main_grad.is_cuda and _triton_available() else "torch"


def grouped_wgrad_accumulate(x: torch.Tensor, grad: torch.Tensor, tokens_per_expert: torch.Tensor,
                             main_grad: torch.Tensor) -> None:
    """main_grad [E, K, N] += x_eᵀ · grad_e per expert (x [T, K], grad [T, N], rows sorted by expert)."""
    if grouped_wgrad_kernel(main_grad) == "triton":
        from .triton_wgrad import grouped_wgrad_accumulate as triton_accumulate

        offs = tokens_per_expert.to(device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        triton_accumulate(x, grad, offs, main_grad)
        return
    counts = [int(n) for n in tokens_per_expert.tolist()]
    acc = main_grad.dtype
    for e, (xe, ge) in enumerate(zip(torch.split(x, counts), torch.split(grad, counts))):
        main_grad[e] += xe.t().to(acc) @ ge.to(acc)


class _GroupedMatmulIntoMainGrad(torch.autograd.Function):
    """grouped_matmul_grouped_mm whose weight gradient goes straight into the parameter's main_grad (DDP's fp32
    buffer), as megatron's linears do under gradient_accumulation_fusion: it sets grad_added_to_main_grad, so
    DDP's hook skips its add, and returns an uninitialised dummy gradient, as megatron's linears do, so the hook
    still fires."""

    @staticmethod
    def forward(ctx, x, param, shape, tokens_per_expert):
        w = param.view(shape)
        ctx.save_for_backward(x, param, tokens_per_expert)
        ctx.shape = shape
        if not grouped_mm_supports(x, w):
            return grouped_matmul(x, w, tokens_per_expert)
        offs = tokens_per_expert.to(device=x.device, dtype=torch.int32, non_blocking=True).cumsum(0, dtype=torch.int32)
        return torch._grouped_mm(x.contiguous(), w, offs=offs)

    @staticmethod
    def backward(ctx, grad_out):
        x, param, tokens_per_expert = ctx.saved_tensors
        w = param.view(ctx.shape)
        grad_out = grad_out.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            w_t = w.transpose(1, 2)  # torch._grouped_mm takes the transposed view as is (no copy)
            if grouped_mm_supports(grad_out, w_t):
                offs = tokens_per_expert.to(device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
                grad_x = torch._grouped_mm(grad_out, w_t, offs=offs)
            else:
                grad_x = grouped_matmul(grad_out, w_t, tokens_per_expert)
        grouped_wgrad_accumulate(x, grad_out, tokens_per_expert, param.main_grad.view(ctx.shape))
        param.grad_added_to_main_grad = True
        return grad_x, torch.empty_like(param), None, None


def grouped_matmul_into_main_grad(x: torch.Tensor, param: torch.Tensor, shape, tokens_per_expert: torch.Tensor):
    """grouped_matmul(x, param.view(shape), tokens_per_expert) whose weight gradient is added into
    param.main_grad.view(shape) inside the backward (param must have DDP's main_grad)."""
    _check_grouped_args(x, param.view(shape), tokens_per_expert)
    return _GroupedMatmulIntoMainGrad.apply(x, param, tuple(shape), tokens_per_expert)
