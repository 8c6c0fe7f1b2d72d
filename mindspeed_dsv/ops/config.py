"""Which implementation each op uses: flags (named like MindSpeed's) x platform -> one name per op.

`resolve_impls(OpsConfig(...), platform)` returns e.g. {'attention': 'sdpa_pad_v', 'rms_norm': 'torch', ...};
`build_ops(...)` binds those names to callables (`Ops`). A flag left off always means the plain-torch reference,
so the default config runs the same math on every device. A flag the device cannot honour is an error at
resolution time (start-up), never a silent fallback in the middle of a run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, fields

OPS = ("attention", "rms_norm", "rotary", "swiglu", "grouped_matmul", "permute", "cross_entropy")

# Every implementation name an op knows, and the devices it runs on.
IMPL_DEVICES: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {
        "torch": ("cpu", "cuda", "npu"),
        "sdpa": ("cpu", "cuda"),  # torch SDPA, V as is (flash excluded when d_v != d_qk)
        "sdpa_pad_v": ("cpu", "cuda"),  # torch SDPA with V padded to d_qk so the flash kernel can run
        "npu": ("npu",),
    },
    "rms_norm": {"torch": ("cpu", "cuda", "npu"), "compile": ("cuda",), "npu": ("npu",)},
    # mla_triton: MLA's query/key rotary inside megatron-core's own Triton kernels (models/rotary.py says how)
    "rotary": {"torch": ("cpu", "cuda", "npu"), "compile": ("cuda",), "mla_triton": ("cuda",), "npu": ("npu",)},
    "swiglu": {"torch": ("cpu", "cuda", "npu"), "compile": ("cuda",), "npu": ("npu",)},
    "grouped_matmul": {"torch": ("cpu", "cuda", "npu"), "grouped_mm": ("cpu", "cuda"), "npu": ("npu",)},
    "permute": {"torch": ("cpu", "cuda", "npu"), "compile": ("cuda",), "npu": ("npu",)},
    # torch: megatron's vocab_parallel_cross_entropy; fused: one pass forward, one backward, no fp32 softmax kept
    "cross_entropy": {"torch": ("cpu", "cuda", "npu"), "fused": ("cpu", "cuda", "npu"), "compile": ("cuda",)},
}

# What each flag turns on, per device. A device missing from the inner dict cannot honour the flag.
_FLAG_CHOICE: dict[str, tuple[str, dict[str, str]]] = {
    "use_flash_attn": ("attention", {"cpu": "sdpa", "cuda": "sdpa", "npu": "npu"}),  # sdpa beat sdpa_pad_v on H200 (bench_ops)
    "use_fused_rmsnorm": ("rms_norm", {"cuda": "compile", "npu": "npu"}),
    "use_fused_rotary_pos_emb": ("rotary", {"cuda": "mla_triton", "npu": "npu"}),
    "use_fused_swiglu": ("swiglu", {"cuda": "compile", "npu": "npu"}),
    "moe_grouped_gemm": ("grouped_matmul", {"cpu": "grouped_mm", "cuda": "grouped_mm", "npu": "npu"}),
    "use_fused_moe_token_permute_and_unpermute": ("permute", {"cuda": "compile", "npu": "npu"}),
    "cross_entropy_loss_fusion": ("cross_entropy", {"cpu": "fused", "cuda": "compile", "npu": "fused"}),
}


# What an implementation name runs, for `describe_flags` (the check command, --dry-run, docs/en/ops.md).
IMPL_KERNELS: dict[tuple[str, str], str] = {
    ("attention", "npu"): "torch_npu.npu_fusion_attention (SBH/TND, sparse_mode 3, V zero-padded to d_qk)",
    ("attention", "sdpa"): "torch scaled_dot_product_attention",
    ("attention", "sdpa_pad_v"): "torch scaled_dot_product_attention, V zero-padded to d_qk",
    ("rms_norm", "npu"): "torch_npu.npu_rms_norm",
    ("rotary", "npu"): "torch_npu.npu_rotary_mul",
    ("rotary", "mla_triton"): "megatron-core's Triton MLA RoPE (fused_mla_yarn_rope_apply: the query rotated in place, "
                              "key and value split from the up-projection with the rotated shared key part in one "
                              "kernel; no concatenation)",
    ("swiglu", "npu"): "torch_npu.npu_swiglu",
    ("grouped_matmul", "npu"): "torch_npu.npu_grouped_matmul (one 3-D weight, up to 1024 experts per rank)",
    ("grouped_matmul", "grouped_mm"): "torch._grouped_mm",
    ("permute", "npu"): "torch_npu.npu_moe_token_permute / npu_moe_token_unpermute (bf16 only)",
    ("cross_entropy", "fused"): "torch, one pass over the logits forward and one backward, no fp32 softmax kept (ops/cross_entropy.py)",
}


def kernel_of(op: str, impl: str) -> str:
    if impl == "torch":
        return "plain torch (the reference)"
    if impl == "compile":
        return "torch.compile of the reference (triton)"
    return IMPL_KERNELS[(op, impl)]


class OpUnavailableError(RuntimeError):
    """A flag or override asks for a kernel the current device cannot run."""


@dataclass(frozen=True)
class OpsConfig:
    """Kernel switches, named after MindSpeed-LLM's command-line flags (``--use-flash-attn`` -> use_flash_attn).

    All off = the plain-torch reference everywhere. See docs/en/ops.md for what each flag selects per device.
    """

    use_flash_attn: bool = False
    use_fused_rmsnorm: bool = False
    use_fused_rotary_pos_emb: bool = False
    use_fused_swiglu: bool = False
    moe_grouped_gemm: bool = False
    use_fused_moe_token_permute_and_unpermute: bool = False
    cross_entropy_loss_fusion: bool = False

    @classmethod
    def from_args(cls, args) -> "OpsConfig":
        """From an argparse namespace (or any object); missing attributes keep their default."""
        return cls(**{f.name: bool(getattr(args, f.name, f.default)) for f in fields(cls)})

    @staticmethod
    def flag_name(field_name: str) -> str:
        return "--" + field_name.replace("_", "-")


def _device_type(platform) -> str:
    if platform is None:
        from mindspeed_dsv.platform import current_platform

        platform = current_platform()
    device_type = platform if isinstance(platform, str) else platform.device_type
    if device_type not in ("cpu", "cuda", "npu"):
        raise ValueError(f"unknown device type {device_type!r}: expected 'cpu', 'cuda' or 'npu'")
    return device_type


def _check_runtime(op: str, impl: str, device_type: str, why: str) -> None:
    """Fail early on what the device type allows in principle but this install cannot run."""
    # mla_triton: megatron-core's Triton kernels, imported by megatron itself (a MagicMock stands in without triton)
    if impl in ("compile", "mla_triton") and importlib.util.find_spec("triton") is None:
        raise OpUnavailableError(
            f"{why} selects {kernel_of(op, impl)} for {op} on cuda, which needs triton; it is not installed "
            f"(pip install triton matching your torch) or turn the flag off"
        )
    if impl == "grouped_mm":
        from . import moe

        if not moe.has_grouped_mm():
            raise OpUnavailableError(
                f"{why} selects torch._grouped_mm for grouped_matmul but this torch has none; "
                f"use torch>=2.8 or turn the flag off"
            )


def resolve_impls(ops_cfg: OpsConfig | None = None, platform=None, overrides: dict | None = None,
                  check_install: bool = True) -> dict:
    """Map each op to the implementation name it will use.

    ops_cfg: the flags (default: all off). platform: a `Platform`, a device type string, or None for
    `current_platform()`. overrides: {op: impl} forced choices (benchmarks, tests), validated like flags.
    check_install: also check that this install can run the choice (triton, torch._grouped_mm); off when
    resolving for another machine's device (dry runs, `platform.check --device`).
    Raises OpUnavailableError naming the flag when the device cannot honour it.
    """
    ops_cfg = ops_cfg or OpsConfig()
    device_type = _device_type(platform)
    impls = {op: "torch" for op in OPS}
    for flag, (op, per_device) in _FLAG_CHOICE.items():
        if not getattr(ops_cfg, flag):
            continue
        why = OpsConfig.flag_name(flag)
        if device_type not in per_device:
            able = ", ".join(sorted(per_device)) or "no device"
            raise OpUnavailableError(
                f"{why} asks for a fused {op} kernel, which {device_type} does not have "
                f"(available on: {able}); drop the flag on {device_type}"
            )
        impls[op] = per_device[device_type]
        if check_install:
            _check_runtime(op, impls[op], device_type, why)
    for op, impl in (overrides or {}).items():
        if op not in IMPL_DEVICES:
            raise ValueError(f"override for unknown op {op!r}; ops are {list(OPS)}")
        if impl not in IMPL_DEVICES[op]:
            raise ValueError(f"unknown implementation {impl!r} for {op}; known: {sorted(IMPL_DEVICES[op])}")
        if device_type not in IMPL_DEVICES[op][impl]:
            raise OpUnavailableError(
                f"{op} implementation {impl!r} runs on {IMPL_DEVICES[op][impl]}, not on {device_type}"
            )
        if check_install:
            _check_runtime(op, impl, device_type, f"override {op}={impl}")
        impls[op] = impl
    return impls


def describe(ops_cfg: OpsConfig, impls: dict) -> str:
    """One line for the training log: flags on, and what each op resolved to."""
    on = [OpsConfig.flag_name(k) for k, v in asdict(ops_cfg).items() if v]
    return f"ops flags: {' '.join(on) or '(none)'}; kernels: " + ", ".join(f"{k}={v}" for k, v in impls.items())


def describe_flags(ops_cfg: OpsConfig, platform=None, check_install: bool = True) -> list[str]:
    """One line per kernel flag that is on: the op it concerns and what runs it on this device, or why the device
    refuses it. Each flag is resolved on its own, so one refusal does not hide the others."""
    device_type = _device_type(platform)
    lines = []
    for flag, (op, _) in _FLAG_CHOICE.items():
        if not getattr(ops_cfg, flag):
            continue
        try:
            impl = resolve_impls(OpsConfig(**{flag: True}), device_type, check_install=check_install)[op]
            lines.append(f"{OpsConfig.flag_name(flag)}: {op} -> {impl}: {kernel_of(op, impl)}")
        except OpUnavailableError as err:
            lines.append(f"{OpsConfig.flag_name(flag)}: {op} -> refused: {err}")
    return lines
