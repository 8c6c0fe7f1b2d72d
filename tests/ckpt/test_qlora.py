"""hf2mcore --qlora-nf4: targeted linears are stored as NF4 per rank shard, byte-identical to bitsandbytes'
quantize_4bit of the same shard sliced here from the HF tensor; mcore2hf dequantizes them and merges LoRA into
the dequantized base (W_nf4 + alpha/r * B @ A, with W_nf4 from bitsandbytes' dequantize_4bit)."""

import json
import os

import pytest
import torch

from ckpt_convert.cli import main
from ckpt_convert.hf_io import read_all
from tests.ckpt.helpers import make_hf_dir
from tests.ckpt.test_lora import ALPHA, R, write_adapter_ckpt

bnb = pytest.importorskip("bitsandbytes")
TARGETS = ["linear_proj", "linear_fc1", "linear_kv_down_proj"]


def bnb_nf4(w: torch.Tensor):
    """bitsandbytes' own NF4 (blocksize 64, no double quantization) of w: (packed uint8, absmax, dequantized)."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    q, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    return q.flatten(), state.absmax, dequantize_4bit(q, state, blocksize=64, quant_type="nf4")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    src = make_hf_dir(str(root / "hf"), mtp=False)
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(root / "nf4"), "--target-tensor-parallel-size", "2",
                 "--qlora-nf4", "--lora-target-modules", *TARGETS, "--no-progress"]) == 0
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(root / "plain"), "--target-tensor-parallel-size",
                 "2", "--no-progress"]) == 0
    return src, root, read_all(src)


def test_nf4_shards_equal_bitsandbytes(converted):
    src, root, hf = converted
    r1 = torch.load(root / "nf4/iter_0000001/mp_rank_01/model_optim_rng.pt", weights_only=False)
    sd = r1["model"]
    assert r1["args"].qlora_nf4 is True
    assert json.load(open(root / "nf4/convert.json"))["qlora_nf4"]["target_modules"] == sorted(TARGETS)
    L0, L1 = "model.layers.0.", "model.layers.1."
    shards = {  # rank 1's shard, sliced here
        "decoder.layers.0.self_attention.linear_proj.weight": hf[L0 + "self_attn.o_proj.weight"][:, 64:],
        "decoder.layers.0.mlp.linear_fc1.weight": torch.cat([hf[L0 + "mlp.gate_proj.weight"][128:],
                                                             hf[L0 + "mlp.up_proj.weight"][128:]]),
        "decoder.layers.1.self_attention.linear_kv_down_proj.weight": hf[L1 + "self_attn.kv_a_proj_with_mqa.weight"],
        "decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight": torch.cat(
            [hf[L1 + "mlp.experts.5.gate_proj.weight"][32:], hf[L1 + "mlp.experts.5.up_proj.weight"][32:]]),
    }
    for key, w in shards.items():
        entry = sd[key]
        assert isinstance(entry, dict), key
        packed, absmax, _ = bnb_nf4(w)
        assert torch.equal(entry["packed"], packed) and torch.equal(entry["absmax"], absmax), key
        assert entry["shape"].tolist() == list(w.shape) and entry["blocksize"] == 64
    # untargeted linears and everything else stay plain tensors
    assert torch.equal(sd["decoder.layers.0.self_attention.linear_q_up_proj.weight"],
                       hf[L0 + "self_attn.q_b_proj.weight"][hf[L0 + "self_attn.q_b_proj.weight"].shape[0] // 2:])
    assert torch.is_tensor(sd["decoder.layers.1.mlp.router.weight"])
    # 4 bits per weight + one float32 absmax per 64 weights: 0.5625 of 4 bytes (fp32) per targeted weight
    plain = torch.load(root / "plain/iter_0000001/mp_rank_01/model_optim_rng.pt", weights_only=False)["model"]
    quantized = [k for k, v in sd.items() if isinstance(v, dict)]
    assert len(quantized) == 4 * 2 + 1 + 3 * (8 + 1)  # o_proj, kv_a per layer; fc1: dense, or 8 experts + shared
    fp32 = sum(plain[k].numel() * 4 for k in quantized)
    nf4 = sum(sd[k]["packed"].numel() + sd[k]["absmax"].numel() * 4 for k in quantized)
    assert nf4 == pytest.approx(fp32 * 0.5625 / 4, rel=0.01)
    size = lambda d: (root / d / "iter_0000001/mp_rank_01/model_optim_rng.pt").stat().st_size  # noqa: E731
    assert size("plain") - size("nf4") > 0.95 * (fp32 - nf4)


def test_merge_against_dequantized_nf4_base(converted, tmp_path):
    src, root, hf = converted
    expected = write_adapter_ckpt(str(root / "plain"), str(tmp_path / "lora"), hf, with_experts=True)
    assert main(["mcore2hf", "--load-dir", str(root / "nf4"), "--lora-load", str(tmp_path / "lora"), "--save-dir",
                 str(tmp_path / "merged"), "--lora-r", str(R), "--lora-alpha", str(ALPHA), "--no-progress"]) == 0
    out = read_all(str(tmp_path / "merged"))
    L0 = "model.layers.0."
    # o_proj: row-split, each TP shard quantized on its own
    w = hf[L0 + "self_attn.o_proj.weight"]
    base = torch.cat([bnb_nf4(w[:, :64])[2], bnb_nf4(w[:, 64:])[2]], dim=1)
    a, b = expected[L0 + "self_attn.o_proj.weight"]
    torch.testing.assert_close(out[L0 + "self_attn.o_proj.weight"], base + (ALPHA / R) * (b @ a), rtol=0, atol=1e-6)
    assert not torch.allclose(base, w)  # NF4 is lossy: the merge really used the quantized base
    # gate/up: the fused fc1 shard [gate_k; up_k] was quantized as one tensor
    g, u = hf[L0 + "mlp.gate_proj.weight"], hf[L0 + "mlp.up_proj.weight"]
    deq = [bnb_nf4(torch.cat([g[k * 128:(k + 1) * 128], u[k * 128:(k + 1) * 128]]))[2] for k in range(2)]
    base_up = torch.cat([d[128:] for d in deq])
    a, b = expected[L0 + "mlp.up_proj.weight"]
    torch.testing.assert_close(out[L0 + "mlp.up_proj.weight"], base_up + (ALPHA / R) * (b @ a), rtol=0, atol=1e-6)
    # an untargeted linear merges into its exact base
    a, b = expected[L0 + "self_attn.q_b_proj.weight"]
    want = hf[L0 + "self_attn.q_b_proj.weight"] + (ALPHA / R) * (b @ a)
    torch.testing.assert_close(out[L0 + "self_attn.q_b_proj.weight"], want, rtol=0, atol=1e-6)


def test_qlora_flags_checked(converted, tmp_path, capsys):
    src, _, _ = converted
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "x"), "--qlora-nf4", "--no-progress"]) == 2
    assert "--qlora-nf4 needs --lora-target-modules" in capsys.readouterr().err
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "x"), "--qlora-nf4",
                 "--lora-target-modules", "linear_qkvz", "--no-progress"]) == 2
    assert "unknown module(s) ['linear_qkvz']" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x" / "latest_checkpointed_iteration.txt")
