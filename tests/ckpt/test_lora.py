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


def write_adapter_ckpt(base_dir, out_dir, hf, with_experts, with_mlp=True, record=True):
    """Adapters for every LoRA-able linear, sharded by hand: column base -> A whole, B rows of this rank
    (linear_fc1: [B_gate rows; B_up rows]); row base -> A columns of this rank, B whole. `record`: the rank
    files' args carry lora_r/lora_alpha/lora_target_modules as training writes them."""
    import argparse
    import json
    import shutil

    layout = ParallelLayout.load(base_dir)
    cfg = json.load(open(os.path.join(base_dir, "config.json")))
    expected = {}
    chunks_of = {}
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
        chunks_of[(tp, pp, ep)] = chunks
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for ch in chunks_of.values() for sd in ch.values()
                      for k in sd})
    args = argparse.Namespace(lora_r=R, lora_alpha=ALPHA, lora_target_modules=targets) if record else None
    for (tp, pp, ep), chunks in chunks_of.items():
        save_rank_file(rank_file(out_dir, layout, tp, pp, ep), chunks, args)
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
    # r and alpha come from the adapter checkpoint's recorded args; no flag needed
    assert main(["mcore2hf", "--load-dir", mc, "--lora-load", str(tmp_path / "lora"), "--save-dir",
                 str(tmp_path / "merged"), "--no-progress"]) == 0
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
                 "--save-lora-to-hf", "--no-progress"]) == 0
    import json

    peft_cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert (peft_cfg["r"], peft_cfg["lora_alpha"]) == (R, ALPHA)  # the recorded values
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


@pytest.mark.parametrize("flag, value, recorded, same", [("--lora-alpha", "16", "lora_alpha 8.0", "8"),
                                                         ("--lora-r", "8", "lora_r 4", "4")])
def test_conflicting_lora_flag_is_refused(base, tmp_path, capsys, flag, value, recorded, same):
    src, mc, hf = base
    write_adapter_ckpt(mc, str(tmp_path / "lora"), hf, with_experts=False)
    merge = ["mcore2hf", "--load-dir", mc, "--lora-load", str(tmp_path / "lora"), "--save-dir", str(tmp_path / "m")]
    export = ["mcore2hf", "--load-dir", str(tmp_path / "lora"), "--save-dir", str(tmp_path / "p"), "--save-lora-to-hf"]
    for argv in (merge, export):
        assert main(argv + [flag, value, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {value}" in err and f"conflicts with {recorded} recorded" in err, err
    assert not os.path.exists(tmp_path / "m") and not os.path.exists(tmp_path / "p")
    # the same value as recorded is accepted
    assert main(merge + [flag, same, "--no-progress"]) == 0


def test_target_modules_checked_against_record(base, tmp_path, capsys):
    src, mc, hf = base
    write_adapter_ckpt(mc, str(tmp_path / "lora"), hf, with_experts=False, with_mlp=False)
    assert main(["mcore2hf", "--load-dir", mc, "--lora-load", str(tmp_path / "lora"), "--save-dir",
                 str(tmp_path / "m"), "--lora-target-modules", "linear_proj", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--lora-target-modules linear_proj conflicts" in err and "linear_kv_down_proj" in err, err
    assert main(["mcore2hf", "--load-dir", str(tmp_path / "lora"), "--save-dir", str(tmp_path / "p"),
                 "--save-lora-to-hf", "--lora-target-modules", "linear_fc1", "--no-progress"]) == 2
    assert "not trained: linear_fc1" in capsys.readouterr().err
    # export may select part of the recorded modules
    assert main(["mcore2hf", "--load-dir", str(tmp_path / "lora"), "--save-dir", str(tmp_path / "p"),
                 "--save-lora-to-hf", "--lora-target-modules", "linear_proj", "--no-progress"]) == 0
    import json

    assert json.load(open(tmp_path / "p" / "adapter_config.json"))["target_modules"] == [
        f"model.layers.{i}.self_attn.o_proj" for i in range(4)]


def test_unrecorded_adapters_need_the_flags(base, tmp_path, capsys):
    src, mc, hf = base
    write_adapter_ckpt(mc, str(tmp_path / "lora"), hf, with_experts=False, record=False)
    assert main(["mcore2hf", "--load-dir", mc, "--lora-load", str(tmp_path / "lora"), "--save-dir",
                 str(tmp_path / "m"), "--lora-r", str(R), "--no-progress"]) == 2
    assert "records no LoRA settings" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])
def test_no_lora_weight_matched_is_an_error_for_any_workers(base, tmp_path, capsys, workers):
    import argparse
    import shutil

    src, mc, hf = base
    layout = ParallelLayout.load(mc)
    lora = str(tmp_path / "lora")
    args = argparse.Namespace(lora_r=R, lora_alpha=ALPHA, lora_target_modules=["linear_proj"])
    for tp, pp, ep in all_ranks(layout):  # rank files without any adapter of this model
        save_rank_file(rank_file(lora, layout, tp, pp, ep), {nm.chunk_key(layout, 0): {}}, args)
    layout.save(lora)
    for f in ("config.json", "latest_checkpointed_iteration.txt"):
        shutil.copy(os.path.join(mc, f), lora)
    out = tmp_path / "m"
    assert main(["mcore2hf", "--load-dir", mc, "--lora-load", lora, "--save-dir", str(out), "--workers",
                 str(workers), "--no-progress"]) == 2
    assert "no LoRA weights matched any base tensor" in capsys.readouterr().err
    # no shards, no index, no partial directory left behind (the export is staged beside --save-dir)
    assert not out.exists() or not any(out.iterdir())
    assert not [p.name for p in tmp_path.iterdir() if ".partial" in p.name]
