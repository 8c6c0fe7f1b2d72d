"""The official DeepSeek-V4 release's quantized weights, dequantized by hf2mcore on the fly: FP8 e4m3 with one
ue8m0 scale per 128x128 block (`<name>.scale`) and FP4 e2m1 routed experts (two values per int8 byte, low nibble
first) with one ue8m0 scale per 32 input columns, the MTP layer's included. Checked against the formulas written
out here."""

import os

import torch

from ckpt_convert.cli import main
from tests.ckpt.test_deepseek4_convert import transformers_state, write_hf
from tests.model.deepseek4_reference import tiny_v4_config


def e2m1(code: int) -> float:
    """OCP e2m1: sign bit, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal (m/2)."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m / 2 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2))


def fp4_reference(packed: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    rows, half = packed.shape
    out = torch.empty(rows, 2 * half, dtype=torch.float64)
    for i in range(rows):
        for j in range(2 * half):
            byte = int(packed[i, j // 2]) & 0xFF
            code = byte & 0xF if j % 2 == 0 else byte >> 4
            out[i, j] = e2m1(code) * 2.0 ** int(exponents[i, j // 32])
    return out


def fp8_reference(q: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    out = q.double().clone()
    for bi in range(exponents.shape[0]):
        for bj in range(exponents.shape[1]):
            out[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] *= 2.0 ** int(exponents[bi, bj])
    return out


def ue8m0(exponents: torch.Tensor) -> torch.Tensor:
    """2**e as float8_e8m0fnu (the release's scale dtype)."""
    return torch.pow(2.0, exponents.float()).to(torch.float8_e8m0fnu)


def test_fp8_and_fp4_are_dequantized_by_formula(tmp_path):
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config
    from mindspeed_dsv.models.deepseek4.names import transformers_to_official

    g = torch.Generator().manual_seed(0)
    sd = transformers_to_official(transformers_state(), DeepSeekV4Config.from_hf(tiny_v4_config()))
    # FP8: layer 2's wq_b [128, 32] in one block column, wo_a [32, 64]; exponents in [-8, 2]
    fp8 = {}
    for name in ("layers.2.attn.wq_b.weight", "layers.2.attn.wo_a.weight", "mtp.0.e_proj.weight"):
        shape = sd[name].shape
        q = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        exps = torch.randint(-8, 3, (-(-shape[0] // 128), -(-shape[1] // 128)), generator=g)
        sd[name], sd[name[:-len("weight")] + "scale"] = q, ue8m0(exps)
        fp8[name] = fp8_reference(q, exps)
    # FP4: every routed expert of layer 3 and of the MTP layer (w1/w3 [32, 64] -> packed [32, 32]; w2 [64, 32] ->
    # [64, 16])
    fp4 = {}
    for e in range(4):
        for w, head in ((w, h) for w in ("w1", "w2", "w3") for h in ("layers.3", "mtp.0")):
            name = f"{head}.ffn.experts.{e}.{w}.weight"
            rows, cols = sd[name].shape
            packed = torch.randint(-128, 128, (rows, cols // 2), generator=g, dtype=torch.int8)
            exps = torch.randint(-6, 2, (rows, cols // 32), generator=g)
            sd[name], sd[name[:-len("weight")] + "scale"] = packed, ue8m0(exps)
            fp4[name] = fp4_reference(packed, exps)
    src = write_hf(tmp_path / "release", sd)
    out = str(tmp_path / "mc")
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", out, "--no-progress"]) == 0
    model = torch.load(os.path.join(out, "iter_0000001", "mp_rank_00", "model_optim_rng.pt"), weights_only=False)["model"]
    bf16 = lambda t: t.to(torch.bfloat16)  # noqa: E731  (the default dequantized dtype, as the official recipe)
    assert torch.equal(model["layers.2.self_attention.linear_q_up_proj.weight"], bf16(fp8["layers.2.attn.wq_b.weight"]))
    assert torch.equal(model["layers.2.self_attention.linear_o_group_proj"], bf16(fp8["layers.2.attn.wo_a.weight"]))
    assert torch.equal(model["mtp.layers.0.e_proj.weight"], bf16(fp8["mtp.0.e_proj.weight"]))
    for e in range(4):
        for head, ours in (("layers.3", "layers.3"), ("mtp.0", "mtp.layers.0.transformer_layer")):
            fc1 = torch.cat([fp4[f"{head}.ffn.experts.{e}.w1.weight"], fp4[f"{head}.ffn.experts.{e}.w3.weight"]])
            assert torch.equal(model[f"{ours}.mlp.experts.local_experts.{e}.linear_fc1.weight"], bf16(fc1))
            assert torch.equal(model[f"{ours}.mlp.experts.local_experts.{e}.linear_fc2.weight"],
                               bf16(fp4[f"{head}.ffn.experts.{e}.w2.weight"]))
    # the unquantized tensors keep their dtype (a float32 norm stays float32)
    assert model["layers.3.input_layernorm.weight"].dtype == torch.float32
    assert model["layers.3.self_attention.linear_q_up_proj.weight"].dtype == torch.bfloat16
