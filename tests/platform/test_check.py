"""`python -m mindspeed_dsv.platform.check`: the machine, and what each kernel flag resolves to."""

import sys
import types

import pytest

from mindspeed_dsv.platform import check
from mindspeed_dsv.platform import device as device_mod

A2_KERNEL_FLAGS = ["--use-flash-attn", "--use-fused-rmsnorm", "--use-fused-rotary-pos-emb", "--use-fused-swiglu",
                   "--moe-grouped-gemm", "--use-fused-moe-token-permute-and-unpermute"]


def test_check_npu_resolution_of_the_a2_kernel_flags(capsys):
    assert check.main(["--device", "npu", "--", *A2_KERNEL_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "torch: 2.13.0" in out and "backend: gloo" in out  # this (cpu) machine
    kernels = out.split("kernel flags on npu:\n")[1].splitlines()
    assert kernels == [
        "  --use-flash-attn: attention -> npu: torch_npu.npu_fusion_attention (SBH/TND, sparse_mode 3, V zero-padded"
        " to d_qk)",
        "  --use-fused-rmsnorm: rms_norm -> npu: torch_npu.npu_rms_norm",
        "  --use-fused-rotary-pos-emb: rotary -> npu: torch_npu.npu_rotary_mul",
        "  --use-fused-swiglu: swiglu -> npu: torch_npu.npu_swiglu",
        "  --moe-grouped-gemm: grouped_matmul -> npu: torch_npu.npu_grouped_matmul (one 3-D weight, up to 1024 "
        "experts per rank)",
        "  --use-fused-moe-token-permute-and-unpermute: permute -> npu: torch_npu.npu_moe_token_permute / "
        "npu_moe_token_unpermute (bf16 only)",
    ]


def test_check_npu_flags_refused_on_cpu_are_named(capsys):
    check.main(["--device", "cpu", "--", "--use-fused-rmsnorm", "--use-flash-attn"])
    out = capsys.readouterr().out
    assert "--use-fused-rmsnorm: rms_norm -> refused: --use-fused-rmsnorm asks for a fused rms_norm kernel" in out
    assert "--use-flash-attn: attention -> sdpa" in out  # one refusal does not hide the other flags


def test_check_on_the_emulated_npu_reads_cann(monkeypatch, tmp_path, capsys):
    (tmp_path / "x86_64-linux").mkdir()
    (tmp_path / "x86_64-linux" / "ascend_toolkit_install.info").write_text("package_name=Ascend-cann-toolkit\n"
                                                                         "version=8.3.RC1\n")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(check.importlib.metadata, "version", lambda name: {"torch-npu": "2.13.0"}.get(name, "x"))
    monkeypatch.setenv("MINDSPEED_DSV_DEVICE", "npu-emulated")
    npu = types.SimpleNamespace(get_device_name=lambda: "Ascend910B3", device_count=lambda: 8)
    monkeypatch.setattr(device_mod.torch, "npu", npu, raising=False)
    device_mod.current_platform.cache_clear()
    try:
        lines = check.report(None, ["--use-fused-swiglu"])
    finally:
        device_mod.current_platform.cache_clear()
    assert lines[:4] == ["device: npu (emulated: tensors on the host, gloo)", "device name: Ascend910B3",
                         "device count: 8", "backend: gloo"]
    assert "torch_npu: 2.13.0" in lines and "CANN: 8.3.RC1" in lines
    assert lines[-2:] == ["kernel flags on npu:", "  --use-fused-swiglu: swiglu -> npu: torch_npu.npu_swiglu"]


def test_check_npu_typo_in_training_flags_exits_2():
    with pytest.raises(SystemExit) as e:
        check.main(["--", "--use-fused-rmsnrm"])
    assert e.value.code == 2
