"""CUDA implementations that are not plain torch: torch.compile'd (inductor/Triton) fusions of the references.

The compiled functions are the reference code itself, so their math is the reference's; inductor fuses the
elementwise chain into one kernel (rms_norm: 1 read + 1 write instead of ~6 passes). Compilation happens on
first call per shape. With TORCHDYNAMO_DISABLE=1 they run eagerly (still correct, not faster).
Attention (torch SDPA) and grouped matmul (torch._grouped_mm) are device-agnostic and live with their op.
"""

from __future__ import annotations

import functools

import torch

from . import cross_entropy as _ce
from . import moe
from .rmsnorm import rms_norm as _rms_norm_ref
from .rotary import apply_rotary as _apply_rotary_ref
from .swiglu import swiglu as _swiglu_ref


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def rms_norm(x, weight, eps):
    return _compiled(_rms_norm_ref)(x, weight, eps)


def apply_rotary(x, cos, sin, interleaved: bool = True):
    return _compiled(_apply_rotary_ref)(x, cos, sin, interleaved)


def swiglu(x):
    return _compiled(_swiglu_ref)(x)


def permute(tokens, indices):
    return _compiled(moe.permute)(tokens, indices)


def unpermute(permuted_tokens, sorted_indices, probs):
    return _compiled(moe.unpermute)(permuted_tokens, sorted_indices, probs)


def cross_entropy(logits, labels, tp_group=None):
    return _ce.fused_cross_entropy(logits, labels, tp_group, tuple(_compiled(f) for f in _ce.EAGER_PASSES))
