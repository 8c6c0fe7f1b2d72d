"""LoRA merge on the way to HF equals W + alpha/r * B @ A computed here on full matrices; the PEFT export loads
in `peft` and gives the merged model's logits."""

import os
import zlib

import pytest
import torch

from ckpt_convert.cli import main
from ckpt_convert.mcore_io import all_ranks, rank_file, save_rank_file
from mindspeed_dsv.layout import ParallelLayout
from mindspeed_dsv.models import names as nm
from ckpt_convert.hf_io import read_all
from tests.ckpt.helpers import make_hf_dir

R, ALPHA = 4, 8.0


def full_adapter(hf_module: str, out_f: int, in_f: int):
    g = torch.Generator().manual_seed(zlib.crc32(hf_module.encode()))
    return torch.randn(R, in_f, generator=g) * 0.1, torch.randn(out_f, R, generator=g) * 0.1


def write_adapter_ckpt(base_dir, out_dir, hf, with_experts, with_mlp=True):
    """Adapters for every LoRA-able linear, sharded by hand: column base -> A whole, B rows of this rank
    (linear_fc1: [B_gate rows; B_up rows]); row base -> A columns of this rank, B whole."""
    import json
    import shutil

    layout = ParallelLayout.load(base_dir)
    cfg = json.load(open(os.path.join(base_dir, "config.json")))
    expected = {}
    for tp, pp, ep in all_ranks(layout):
        chunks = {}
        for c in range(layout.num_model_chunks):
            sd = {}
            for m in nm.rank_maps(cfg, layout, tp, pp, ep, c):
                if m.lora_module is None or ("local_experts" in m.mcore and not with_experts):
                    continue
                if not with_mlp and ".mlp." in m.mcore:
                    continue
                k, n = m.tp_rank, m.tp
                if m.split == nm.GLU:
                    (ga, gb), (ua, ub) = (full_adapter(nm.hf_module(h), *hf[h].shape) for h in m.hf)
                    a_full = ga  # gate and up share A in Megatron's fused linear_fc1
                    ub_used = ub
                    s = gb.shape[0] // n
                    a, b = a_full, torch.cat([gb[k * s:(k + 1) * s], ub_used[k * s:(k + 1) * s]])
                    expected[m.hf[0]] = (ga, gb)
                    expected[m.hf[1]] = (ga, ub_used)
                else:
                    h = m.hf[0]
                    a_full, b_full = full_adapter(nm.hf_module(h), *hf[h].shape)
                    expected[h] = (a_full, b_full)
                    if m.split == nm.ROW:
                        s = a_full.shape[1] // n
                        a, b = a_full[:, k * s:(k + 1) * s], b_full
                    else:
                        s = b_full.shape[0] // n
                        a, b = a_full, b_full[k * s:(k + 1) * s]
                sd[m.lora_module + ".lora_A.weight"] = a.contiguous()
                sd[m.lora_module + ".lora_B.weight"] = b.contiguous()
            chunks[nm.chunk_key(layout, c)] = sd
        save_rank_file(rank_file(out_dir, layout, tp, pp, ep), chunks, None)
    layout.save(out_dir)
    for f in ("config.json", "latest_checkpointed_iteration.txt", "convert.json"):
        shutil.copy(os.path.join(base_dir, f), out_dir)
    return expected


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    src = make_hf_dir(str(root / "hf"), mtp=False)
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(root / "mc"), "--target-tensor-parallel-size", "2",
                 "--target-expert-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--no-progress"]) == 0
    return src, str(root / "mc"), read_all(src)


def test_merge_equals_independent_formula(base, tmp_path):
    src, mc, hf = base
    expected = write_adapter_ckpt(mc, str(tmp_path / "lora"), hf, with_experts=True)
    assert any(".experts.5." in k for k in expected) and any("o_proj" in k for k in expected)
    assert main(["mcore2hf", "--load-dir", mc, "--lora-load", str(tmp_path / "lora"), "--save-dir",
                 str(tmp_path / "merged"), "--lora-r", str(R), "--lora-alpha", str(ALPHA), "--no-progress"]) == 0
    out = read_all(str(tmp_path / "merged"))
    for k, w in hf.items():
        if k in expected:
            a, b = expected[k]
            want = w + (ALPHA / R) * (b @ a)
            torch.testing.assert_close(out[k], want, rtol=0, atol=1e-6, msg=k)
            assert not torch.equal(out[k], w)
        else:
            assert torch.equal(out[k], w), k


def test_peft_adapter_loads_and_matches_merged_logits(base, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    src, mc, hf = base
    # Attention adapters only: peft 0.21 with transformers 5 re-routes MLP targets of DeepseekV3 (gate_proj/
    # up_proj/down_proj, dense and shared experts included) onto the fused routed-expert parameters, so MLP
    # adapters do not load onto the modules they were trained for (see docs/en/convert.md).
    write_adapter_ckpt(mc, str(tmp_path / "lora"), hf, with_experts=False, with_mlp=False)
    assert main(["mcore2hf", "--load-dir", str(tmp_path / "lora"), "--save-dir", str(tmp_path / "peft"),
                 "--save-lora-to-hf", "--lora-r", str(R), "--lora-alpha", str(ALPHA), "--no-progress"]) == 0
    assert main(["mcore2hf", "--load-dir", mc, "--lora-load", str(tmp_path / "lora"), "--save-dir",
                 str(tmp_path / "merged"), "--lora-r", str(R), "--lora-alpha", str(ALPHA), "--no-progress"]) == 0
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base_model(ids).logits
    model = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "peft")).eval()
    # per layer: q_a, q_b, kv_a, kv_b, o
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_A" in n)
    assert n_lora == 4 * 5, n_lora
    with torch.no_grad():
        got, want = model(ids).logits, merged(ids).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
