"""Bind resolved implementation names to callables: `Ops`, and the process-wide current `Ops`.

Model code calls `get_ops().attention(...)`, or keeps the `Ops` it was built with. `configure_ops` is called
once at start-up (after argument parsing); modules built afterwards pick up its choice.
"""

from __future__ import annotations

import importlib

from .config import OPS, OpsConfig, resolve_impls

# (op, impl) -> (module, {method: function name}). Modules are imported on first use only.
_REGISTRY = {
    ("attention", "torch"): ("attention", {"attention": "attention_packed_torch"}),
    ("attention", "sdpa"): ("attention", {"attention": "attention_sdpa"}),
    ("attention", "sdpa_pad_v"): ("attention", {"attention": "attention_sdpa_pad_v"}),
    ("attention", "npu"): ("npu", {"attention": "attention"}),
    ("rms_norm", "torch"): ("rmsnorm", {"rms_norm": "rms_norm"}),
    ("rms_norm", "compile"): ("cuda", {"rms_norm": "rms_norm"}),
    ("rms_norm", "npu"): ("npu", {"rms_norm": "rms_norm"}),
    ("rotary", "torch"): ("rotary", {"apply_rotary": "apply_rotary"}),
    ("rotary", "compile"): ("cuda", {"apply_rotary": "apply_rotary"}),
    # MLA's rotary then runs inside megatron's attention (models/rotary.py); a direct call gets the compiled one
    ("rotary", "mla_triton"): ("cuda", {"apply_rotary": "apply_rotary"}),
    ("rotary", "npu"): ("npu", {"apply_rotary": "apply_rotary"}),
    ("swiglu", "torch"): ("swiglu", {"swiglu": "swiglu"}),
    ("swiglu", "compile"): ("cuda", {"swiglu": "swiglu"}),
    ("swiglu", "npu"): ("npu", {"swiglu": "swiglu"}),
    ("grouped_matmul", "torch"): ("moe", {"grouped_matmul": "grouped_matmul"}),
    ("grouped_matmul", "grouped_mm"): (
        "moe", {"grouped_matmul": "grouped_matmul_grouped_mm", "grouped_matmul_into_main_grad": "grouped_matmul_into_main_grad"}
    ),
    ("grouped_matmul", "npu"): ("npu", {"grouped_matmul": "grouped_matmul"}),
    ("permute", "torch"): ("moe", {"permute": "permute", "unpermute": "unpermute"}),
    ("permute", "compile"): ("cuda", {"permute": "permute", "unpermute": "unpermute"}),
    ("permute", "npu"): ("npu", {"permute": "permute", "unpermute": "unpermute"}),
    ("cross_entropy", "torch"): ("cross_entropy", {"cross_entropy": "cross_entropy"}),
    ("cross_entropy", "fused"): ("cross_entropy", {"cross_entropy": "fused_cross_entropy"}),
    ("cross_entropy", "compile"): ("cuda", {"cross_entropy": "cross_entropy"}),
}


class Ops:
    """The kernels one run uses. Signatures (identical across implementations):

    attention(q, k, v, softmax_scale, causal=True, attention_mask=None, cu_seqlens=None) -> [s, b, h*d_v]
    rms_norm(x, weight, eps) -> like x
    apply_rotary(x, cos, sin, interleaved=True) -> like x
    swiglu(x) -> [..., d/2]
    grouped_matmul(x [T, K], weights [E, K, N] | list, tokens_per_expert [E]) -> [T, N]
    grouped_matmul_into_main_grad(x, param, shape [E, K, N], tokens_per_expert) -> [T, N], the weight gradient
        added into param.main_grad (gradient-accumulation fusion); None where the implementation has none
    permute(tokens [T, H], indices [T, topk]) -> (permuted [T*topk, H], sorted_indices [T*topk])
    unpermute(permuted, sorted_indices, probs [T, topk]) -> [T, H]
    cross_entropy(logits [s, b, V/tp], labels [s, b], tp_group) -> per-token loss [s, b] (fp32)
    """

    def __init__(self, impls: dict):
        missing = set(OPS) - set(impls)
        if missing:
            raise ValueError(f"Ops needs an implementation for every op; missing {sorted(missing)}")
        self.impls = dict(impls)
        self.grouped_matmul_into_main_grad = None  # optional: only some grouped_matmul implementations have it
        for op, impl in self.impls.items():
            if (op, impl) not in _REGISTRY:
                raise ValueError(f"no implementation {impl!r} registered for op {op!r}")
            module_name, methods = _REGISTRY[(op, impl)]
            module = importlib.import_module(f"{__package__}.{module_name}")
            for method, fn_name in methods.items():
                setattr(self, method, getattr(module, fn_name))

    def __repr__(self):
        return f"Ops({self.impls})"


def build_ops(ops_cfg: OpsConfig | None = None, platform=None, overrides: dict | None = None) -> Ops:
    return Ops(resolve_impls(ops_cfg, platform, overrides))


_current: Ops | None = None


def configure_ops(ops_cfg: OpsConfig | None = None, platform=None, overrides: dict | None = None) -> Ops:
    """Resolve and install the process-wide kernels; returns them."""
    global _current
    _current = build_ops(ops_cfg, platform, overrides)
    return _current


def get_ops() -> Ops:
    """The configured kernels, or the plain-torch references if `configure_ops` was never called."""
    global _current
    if _current is None:
        _current = Ops({op: "torch" for op in OPS})
    return _current
