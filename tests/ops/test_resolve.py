"""Flags x platform -> implementation names, and the errors for what a device cannot do."""

import argparse
from dataclasses import fields

import pytest

from mindspeed_dsv import ops
from mindspeed_dsv.ops import OpsConfig, OpUnavailableError, resolve_impls


def test_defaults_are_the_torch_reference_everywhere():
    for device in ("cpu", "cuda", "npu"):
        assert resolve_impls(OpsConfig(), device) == {op: "torch" for op in ops.OPS}


@pytest.mark.parametrize(
    "flag,op,expected",
    [
        ("use_flash_attn", "attention", {"cpu": "sdpa", "cuda": "sdpa", "npu": "npu"}),
        ("use_fused_rmsnorm", "rms_norm", {"cuda": "compile", "npu": "npu"}),
        ("use_fused_rotary_pos_emb", "rotary", {"cuda": "mla_triton", "npu": "npu"}),
        ("use_fused_swiglu", "swiglu", {"cuda": "compile", "npu": "npu"}),
        ("moe_grouped_gemm", "grouped_matmul", {"cpu": "grouped_mm", "cuda": "grouped_mm", "npu": "npu"}),
        ("use_fused_moe_token_permute_and_unpermute", "permute", {"cuda": "compile", "npu": "npu"}),
        ("cross_entropy_loss_fusion", "cross_entropy", {"cpu": "fused", "cuda": "compile", "npu": "fused"}),
    ],
)
def test_each_flag_on_each_device(flag, op, expected, monkeypatch):
    # pretend triton is installed so 'compile' resolves on this CPU-only machine
    monkeypatch.setattr(ops.config.importlib.util, "find_spec", lambda name: object())
    cfg = OpsConfig(**{flag: True})
    for device in ("cpu", "cuda", "npu"):
        if device in expected:
            impls = resolve_impls(cfg, device)
            assert impls[op] == expected[device]
            assert all(v == "torch" for k, v in impls.items() if k != op)
        else:
            with pytest.raises(OpUnavailableError) as err:
                resolve_impls(cfg, device)
            msg = str(err.value)
            assert OpsConfig.flag_name(flag) in msg and device in msg and "available on" in msg


def test_compile_needs_triton(monkeypatch):
    monkeypatch.setattr(ops.config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OpUnavailableError, match="--use-fused-rmsnorm .* needs triton"):
        resolve_impls(OpsConfig(use_fused_rmsnorm=True), "cuda")


def test_grouped_mm_missing_in_torch(monkeypatch):
    monkeypatch.setattr(ops.moe, "has_grouped_mm", lambda: False)
    with pytest.raises(OpUnavailableError, match="--moe-grouped-gemm .*torch._grouped_mm"):
        resolve_impls(OpsConfig(moe_grouped_gemm=True), "cpu")


def test_overrides_are_validated():
    assert resolve_impls(None, "cpu", overrides={"attention": "sdpa_pad_v"})["attention"] == "sdpa_pad_v"
    with pytest.raises(OpUnavailableError, match="runs on \\('npu',\\), not on cpu"):
        resolve_impls(None, "cpu", overrides={"swiglu": "npu"})
    with pytest.raises(ValueError, match="unknown implementation 'flash3'"):
        resolve_impls(None, "cpu", overrides={"attention": "flash3"})
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        resolve_impls(None, "cpu", overrides={"softmax": "torch"})
    with pytest.raises(ValueError, match="unknown device type 'tpu'"):
        resolve_impls(None, "tpu")


def test_from_args_reads_megatron_style_namespace():
    parser = argparse.ArgumentParser()
    for f in fields(OpsConfig):
        parser.add_argument(OpsConfig.flag_name(f.name), action="store_true")
    args = parser.parse_args(["--use-flash-attn", "--moe-grouped-gemm"])
    cfg = OpsConfig.from_args(args)
    assert cfg == OpsConfig(use_flash_attn=True, moe_grouped_gemm=True)
    assert OpsConfig.from_args(argparse.Namespace()) == OpsConfig()
    assert "--use-flash-attn --moe-grouped-gemm" in ops.describe(cfg, resolve_impls(cfg, "cpu"))


def test_ops_binding_and_current_ops():
    bound = ops.build_ops(OpsConfig(use_flash_attn=True), "cpu")
    assert bound.attention is ops.attention_sdpa and bound.rms_norm is ops.rms_norm
    assert bound.permute is ops.permute and bound.unpermute is ops.unpermute
    try:
        assert ops.configure_ops(OpsConfig(moe_grouped_gemm=True), "cpu") is ops.get_ops()
        assert ops.get_ops().impls["grouped_matmul"] == "grouped_mm"
    finally:
        ops.dispatch._current = None
    assert ops.get_ops().impls == {op: "torch" for op in ops.OPS}
    with pytest.raises(ValueError, match="missing"):
        ops.Ops({"attention": "torch"})
