"""Kernels behind one interface. Each op has a plain-torch reference (cpu, and the truth for tests), and
cuda / npu implementations chosen by `OpsConfig` flags and the platform (see config.py, docs/en/ops.md)."""

from .attention import attention_sdpa, attention_sdpa_pad_v, attention_torch, packed_attention_mask
from .config import IMPL_DEVICES, OPS, OpsConfig, OpUnavailableError, describe, resolve_impls
from .dispatch import Ops, build_ops, configure_ops, get_ops
from .moe import count_tokens_per_expert, grouped_matmul, permute, routed_experts, sort_keys, unpermute
from .rmsnorm import rms_norm
from .rotary import RopeConfig, apply_rotary, rotary_cos_sin, yarn_softmax_scale
from .swiglu import swiglu

__all__ = [
    "attention_torch",
    "attention_sdpa",
    "attention_sdpa_pad_v",
    "packed_attention_mask",
    "rms_norm",
    "RopeConfig",
    "apply_rotary",
    "rotary_cos_sin",
    "yarn_softmax_scale",
    "swiglu",
    "grouped_matmul",
    "permute",
    "unpermute",
    "count_tokens_per_expert",
    "routed_experts",
    "sort_keys",
    "OpsConfig",
    "OpUnavailableError",
    "OPS",
    "IMPL_DEVICES",
    "resolve_impls",
    "describe",
    "Ops",
    "build_ops",
    "configure_ops",
    "get_ops",
]
