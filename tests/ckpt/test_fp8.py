"""FP8 (e4m3 + 128x128 weight_scale_inv) input: dequantized weights equal an independent block dequantization."""

import json
import math

import torch
from safetensors.torch import save_file

from ckpt_convert.cli import main
from ckpt_convert.fp8 import dequantize_block_fp8, quantize_block_fp8
from ckpt_convert.hf_io import HFReader
from ckpt_convert.hf_io import read_all
from tests.ckpt.helpers import make_hf_dir


def reference_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Element by block, written out with explicit loops over the 128x128 tiles (edge tiles partial)."""
    m, n = q.shape
    out = torch.empty(m, n, dtype=torch.float32)
    for bi in range(math.ceil(m / 128)):
        for bj in range(math.ceil(n / 128)):
            rs, cs = slice(bi * 128, min(m, bi * 128 + 128)), slice(bj * 128, min(n, bj * 128 + 128))
            out[rs, cs] = q[rs, cs].to(torch.float32) * s[bi, bj].item()
    return out.to(torch.bfloat16)


def random_fp8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(math.ceil(shape[0] / 128), math.ceil(shape[1] / 128), generator=g) * 1e-3 + 1e-4
    return q, s


def test_block_dequant_matches_reference_on_ragged_shapes(tmp_path):
    tensors = {}
    for i, shape in enumerate([(300, 200), (128, 256), (129, 127), (7, 5)]):
        q, s = random_fp8(shape, i)
        tensors[f"w{i}.weight"], tensors[f"w{i}.weight_scale_inv"] = q, s
    save_file(tensors, str(tmp_path / "model.safetensors"))
    r = HFReader(str(tmp_path))
    assert sorted(r.names()) == ["w0.weight", "w1.weight", "w2.weight", "w3.weight"]
    for i in range(4):
        ref = reference_dequant(tensors[f"w{i}.weight"], tensors[f"w{i}.weight_scale_inv"])
        got = r.read(f"w{i}.weight")
        assert got.dtype == torch.bfloat16 and torch.equal(got, ref)
        assert torch.equal(r.read(f"w{i}.weight", rows=slice(2, 5)), ref[2:5])


def test_fp8_checkpoint_to_mcore_and_back(tmp_path):
    """A tiny DeepSeek-V3 whose linear weights are stored FP8 with scales, as the official checkpoint does."""
    src = make_hf_dir(str(tmp_path / "bf16"), mtp=False)
    hf = read_all(src)
    fp8, expected = {}, {}
    quantized = 0
    for k, v in hf.items():
        if k.endswith("_proj.weight") and "embed" not in k:
            q, s = random_fp8(tuple(v.shape), hash(k) % 1000)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            expected[k] = reference_dequant(q, s)
            quantized += 1
        else:
            fp8[k] = v.to(torch.bfloat16)
            expected[k] = fp8[k]
    assert quantized > 50
    d = tmp_path / "fp8"
    d.mkdir()
    save_file(fp8, str(d / "model.safetensors"))
    cfg = json.load(open(src + "/config.json"))
    cfg["quantization_config"] = {"fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    json.dump(cfg, open(d / "config.json", "w"))

    assert main(["hf2mcore", "--load-dir", str(d), "--save-dir", str(tmp_path / "mc"), "--target-tensor-parallel-size",
                 "2", "--target-expert-parallel-size", "2", "--no-progress"]) == 0
    assert main(["mcore2hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    out = read_all(str(tmp_path / "out"))
    assert set(out) == set(expected)
    for k in expected:
        assert out[k].dtype == torch.bfloat16 and torch.equal(out[k], expected[k]), k
    assert "quantization_config" not in json.load(open(tmp_path / "out/config.json"))

    # --save-fp8 writes e4m3 + scales again; they dequantize back to within e4m3 precision
    assert main(["mcore2hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out8"), "--save-fp8",
                 "--no-progress"]) == 0
    out8 = read_all(str(tmp_path / "out8"))
    k = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert out8[k].dtype == torch.float8_e4m3fn and out8[k + "_scale_inv"].shape == (1, 1)
    assert out8["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    back = reference_dequant(out8[k], out8[k + "_scale_inv"]).float()
    assert torch.allclose(back, expected[k].float(), rtol=0.07, atol=1e-6)
    assert json.load(open(tmp_path / "out8/config.json"))["quantization_config"]["weight_block_size"] == [128, 128]


def test_quantize_then_dequantize_is_close():
    w = torch.randn(300, 200)
    q, s = quantize_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    # the largest magnitude of each block maps to 448
    assert torch.isclose(q[:128, :128].float().abs().max(), torch.tensor(448.0))
    back = dequantize_block_fp8(q, s, torch.float32)
    # e4m3: 3 mantissa bits (relative step 2^-4) for normals, absolute step 2^-9 * scale for subnormals
    assert ((back - w).abs() <= w.abs() * 0.0625 + s.max() * 2**-9).all()
