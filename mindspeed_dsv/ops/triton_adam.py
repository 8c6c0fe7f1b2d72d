"""CUDA: one Adam / AdamW step of one tensor as a Triton kernel (ops/adam.py's `adam_update_` on CUDA tensors).

Reads param, grad, exp_avg, exp_avg_sq once and writes param and the two moments once (28 bytes per fp32
parameter); the gradient is multiplied by megatron's clipping coefficient on the way and never written. The math
is torch's single-tensor Adam in fp32 with round-to-nearest division and square root (ops/adam.py is the
reference; tests/ops/test_adam.py compares them on the GPU).

Imported only where Triton and a CUDA tensor are present.
"""

from __future__ import annotations

import triton
import triton.language as tl

_BLOCK = 2048  # elements per program: 8 per thread at 8 warps, 128-bit loads of fp32


@triton.jit
def _adam_kernel(
    P, G, M, V, n, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, weight_decay, grad_scale, step_size,
    bias_correction2_sqrt, DECOUPLED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(P + offs, mask=mask).to(tl.float32)
    g = tl.load(G + offs, mask=mask).to(tl.float32) * grad_scale
    m = tl.load(M + offs, mask=mask).to(tl.float32)
    v = tl.load(V + offs, mask=mask).to(tl.float32)
    if DECOUPLED:
        p = p * decay
    else:
        g = g + p * weight_decay
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + g * g * one_minus_beta2
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(P + offs, p, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)


def triton_adam_update_(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, decoupled,
                        grad_scale, step_size, bias_correction2_sqrt) -> None:
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous() or t.shape != param.shape:
            raise ValueError(f"FusedAdam: {name} must be contiguous and shaped like the parameter "
                             f"{tuple(param.shape)}, got {tuple(t.shape)} (contiguous: {t.is_contiguous()})")
    n = param.numel()
    if n == 0:
        return
    _adam_kernel[(triton.cdiv(n, _BLOCK),)](
        # the scalars are computed in double here and rounded to fp32 once, as torch's scalar arguments are
        param, grad, exp_avg, exp_avg_sq, n, *(float(x) for x in (
            beta1, 1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay, weight_decay, grad_scale, step_size,
            bias_correction2_sqrt)), DECOUPLED=bool(decoupled), BLOCK=_BLOCK, num_warps=8,
    )

