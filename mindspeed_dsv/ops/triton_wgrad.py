"""CUDA: the routed experts' weight gradient added straight into DDP's fp32 main_grad (a Triton grouped GEMM).

main_grad[e] += x[rows of e]ᵀ · grad[rows of e] for every expert e, with the rows of x [T, K] and grad [T, N]
sorted by expert and `offs` the inclusive cumulative row counts (on the device: no host sync). This is megatron's
gradient-accumulation fusion (wgrad GEMM with beta = 1 into the fp32 buffer) for grouped experts: without it
torch._grouped_mm writes a bf16 [E, K, N] gradient and DDP's hook adds it into the fp32 buffer with a mixed-dtype
`add_` (H200, v2lite proxy: ~30 ms per step). Products accumulate in fp32 inside the kernel and are added to the
fp32 buffer once, so the result is at least as exact as the bf16 gradient plus add (benchmarks/bench_wgrad.py).

Imported only where Triton and a CUDA tensor are present (ops/moe.py chooses); cpu runs the reference there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile shapes tried once per (K, N) on the running GPU. One program owns a [BLOCK_K, BLOCK_N] tile of one expert's
# gradient and walks that expert's rows BLOCK_T at a time; the tile is read and written once.
_CONFIGS = [
    triton.Config({"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_T": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_K": 128, "BLOCK_N": 256, "BLOCK_T": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_T": 64}, num_warps=4, num_stages=4),
    # what bench_wgrad --sweep picked on an H200 for the v2lite proxy's fc1 and fc2 (1.62 / 0.84 ms against 1.86 /
    # 0.96 with the four above)
    triton.Config({"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_T": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_K": 256, "BLOCK_N": 128, "BLOCK_T": 64}, num_warps=8, num_stages=3),
]


# restore_value: tuning runs the kernel once per config; each run would add into the buffer again.
@triton.autotune(configs=_CONFIGS, key=["K", "N"], restore_value=["C"])
@triton.jit
def _grouped_wgrad_kernel(
    X, G, C, OFFS, K, N, stride_xt, stride_gt, stride_ce, stride_ck,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # tiles of one expert run next to each other: its rows stay in L2
    e = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pk = pid // num_n
    pn = pid % num_n
    start = tl.load(OFFS + e - 1, mask=e > 0, other=0).to(tl.int64)
    end = tl.load(OFFS + e).to(tl.int64)
    rk = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + rt
        in_rows = t < end
        a = tl.load(X + t[:, None] * stride_xt + rk[None, :], mask=in_rows[:, None] & (rk[None, :] < K), other=0.0)
        b = tl.load(G + t[:, None] * stride_gt + rn[None, :], mask=in_rows[:, None] & (rn[None, :] < N), other=0.0)
        acc = tl.dot(tl.trans(a), b, acc)
    c_ptrs = C + e.to(tl.int64) * stride_ce + rk[:, None].to(tl.int64) * stride_ck + rn[None, :]
    c_mask = (rk[:, None] < K) & (rn[None, :] < N)
    c = tl.load(c_ptrs, mask=c_mask)
    tl.store(c_ptrs, c + acc, mask=c_mask)


def grouped_wgrad_accumulate(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad [E, K, N] fp32 += per-expert x_eᵀ · grad_e; x [T, K], grad [T, N] bf16/fp16, offs [E] int32."""
    num_experts, k, n = main_grad.shape
    x = x.contiguous()
    grad = grad.contiguous()
    if not main_grad.is_contiguous() or main_grad.dtype != torch.float32:
        raise ValueError(f"grouped_wgrad_accumulate: main_grad must be contiguous fp32, got {main_grad.dtype}")

    def grid(meta):
        return (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]), num_experts)

    _grouped_wgrad_kernel[grid](
        x, grad, main_grad, offs, k, n, x.stride(0), grad.stride(0), main_grad.stride(0), main_grad.stride(1)
    )
