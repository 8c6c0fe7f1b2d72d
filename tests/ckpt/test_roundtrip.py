"""HF -> Megatron -> HF is bit-identical over a grid of layouts; shards equal independently sliced HF tensors;
reshard equals a direct conversion."""

import os

import pytest
import torch

from ckpt_convert.cli import main
from ckpt_convert.hf_io import read_all
from tests.ckpt.helpers import make_hf_dir

GRID = {
    "tp1": dict(mtp=False),
    "tp2_ep2_mtp": dict(tp=2, ep=2),
    "tp2_pp2_ep4_grouped_mtp": dict(tp=2, pp=2, ep=4, grouped=True),
    "pp3_layer_list_ep2": dict(pp=3, ep=2, num_layer_list="1,2,1"),
    "pp3_noop": dict(pp=3, noop_layers="4,5", num_layers=6),
    "pp2_vpp_tp2_mtp": dict(tp=2, pp=2, vpp=1),
    "pp2_vpp_noop_grouped": dict(pp=2, vpp=1, noop_layers="4,5,6,7", num_layers=8, ep=4, grouped=True),
    "dualpipev_pp2_mtp": dict(pp=2, dualpipev=True, ep=2),
    "tp_extend_ep": dict(tp=2, ep=2, tp_extend=True),
    "tp2_etp1": dict(tp=2, etp=1),
    "tp2_etp1_ep2_grouped_mtp": dict(tp=2, ep=2, etp=1, grouped=True),
    "tp2_etp1_ep4": dict(tp=2, ep=4, etp=1, mtp=False),
    "mla_mm_split_tp2": dict(tp=2, mm_split=True),
    "no_mtp_flag": dict(tp=2, mtp_num_layers=0),
}


def flags(case):
    f = ["--target-tensor-parallel-size", str(case.get("tp", 1)), "--target-pipeline-parallel-size",
         str(case.get("pp", 1)), "--target-expert-parallel-size", str(case.get("ep", 1)), "--no-progress"]
    if "vpp" in case:
        f += ["--num-layers-per-virtual-pipeline-stage", str(case["vpp"])]
    if "etp" in case:
        f += ["--target-expert-tensor-parallel-size", str(case["etp"])]
    for key in ("num_layer_list", "noop_layers", "num_layers", "mtp_num_layers"):
        if key in case:
            f += ["--" + key.replace("_", "-"), str(case[key])]
    if case.get("grouped"):
        f.append("--moe-grouped-gemm")
    if case.get("dualpipev"):
        f += ["--schedules-method", "dualpipev"]
    if case.get("tp_extend"):
        f.append("--moe-tp-extend-ep")
    if case.get("mm_split"):
        f.append("--mla-mm-split")
    return f


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {True: make_hf_dir(str(root / "mtp"), mtp=True), False: make_hf_dir(str(root / "plain"), mtp=False)}


@pytest.mark.parametrize("name", list(GRID))
def test_hf_mcore_hf_bit_identical(name, hf_dirs, tmp_path):
    case = GRID[name]
    src = hf_dirs[case.get("mtp", True)]
    drop = ["--allow-unused-weights"] if case.get("mtp_num_layers") == 0 and case.get("mtp", True) else []
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "mc")] + flags(case) + drop) == 0
    assert main(["mcore2hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "hf"),
                 "--no-progress"]) == 0
    a, b = read_all(src), read_all(str(tmp_path / "hf"))
    if case.get("mtp_num_layers") == 0:  # MTP dropped on purpose
        a = {k: v for k, v in a.items() if not k.startswith("model.layers.4.")}
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for f in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert os.path.isfile(tmp_path / "hf" / f)


def _load(path):
    return torch.load(path, weights_only=False)


def test_shards_equal_independent_slices(hf_dirs, tmp_path):
    """TP2/EP2 and grouped GEMM shards against slices of the HF tensors computed here, not by the converter."""
    src = hf_dirs[True]
    hf = read_all(src)
    main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "a"), "--target-tensor-parallel-size", "2",
          "--target-expert-parallel-size", "2", "--no-progress"])
    r1 = _load(tmp_path / "a/iter_0000001/mp_rank_01_001/model_optim_rng.pt")["model"]
    L0, L1 = "model.layers.0.", "model.layers.1."
    # dense layer 0: rank 1 holds [gate rows 128:256; up rows 128:256]
    assert torch.equal(r1["decoder.layers.0.mlp.linear_fc1.weight"],
                       torch.cat([hf[L0 + "mlp.gate_proj.weight"][128:], hf[L0 + "mlp.up_proj.weight"][128:]]))
    assert torch.equal(r1["decoder.layers.0.mlp.linear_fc2.weight"], hf[L0 + "mlp.down_proj.weight"][:, 128:])
    assert torch.equal(r1["decoder.layers.0.self_attention.linear_proj.weight"], hf[L0 + "self_attn.o_proj.weight"][:, 64:])
    # MLA's down projections are replicated over TP: every rank holds the whole matrix
    assert torch.equal(r1["decoder.layers.0.self_attention.linear_kv_down_proj.weight"],
                       hf[L0 + "self_attn.kv_a_proj_with_mqa.weight"])
    # ep rank 1 holds experts 4..7; local expert 1 = expert 5, tp rank 1 half
    assert torch.equal(r1["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"],
                       torch.cat([hf[L1 + "mlp.experts.5.gate_proj.weight"][32:], hf[L1 + "mlp.experts.5.up_proj.weight"][32:]]))
    assert torch.equal(r1["decoder.layers.1.mlp.router.expert_bias"], hf[L1 + "mlp.gate.e_score_correction_bias"])
    assert torch.equal(r1["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"][2048:])
    assert torch.equal(r1["mtp.layers.0.eh_proj.weight"], hf["model.layers.4.eh_proj.weight"][64:])
    assert torch.equal(r1["mtp.layers.0.final_layernorm.weight"], hf["model.layers.4.shared_head.norm.weight"])

    main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "g"), "--target-expert-parallel-size", "2",
          "--moe-grouped-gemm", "--no-progress"])
    g = _load(tmp_path / "g/iter_0000001/mp_rank_00_001/model_optim_rng.pt")["model"]
    w1 = g["decoder.layers.2.mlp.experts.weight1"]
    w2 = g["decoder.layers.2.mlp.experts.weight2"]
    assert w1.shape == (128, 4 * 128) and w2.shape == (4 * 64, 128)
    L2 = "model.layers.2."
    for j, e in enumerate(range(4, 8)):  # GroupedMLP.forward: weight1.view(E, H, -1)[j] = fc1_j^T
        fc1 = torch.cat([hf[L2 + f"mlp.experts.{e}.gate_proj.weight"], hf[L2 + f"mlp.experts.{e}.up_proj.weight"]])
        assert torch.equal(w1.view(4, 128, -1)[j], fc1.t())
        assert torch.equal(w2.view(4, -1, 128)[j], hf[L2 + f"mlp.experts.{e}.down_proj.weight"].t())


@pytest.mark.parametrize("src_case,dst_case", [
    ("tp2_pp2_ep4_grouped_mtp", "pp3_layer_list_ep2"),
    ("dualpipev_pp2_mtp", "tp_extend_ep"),
    ("tp2_etp1_ep2_grouped_mtp", "tp2_pp2_ep4_grouped_mtp"),
    ("tp2_pp2_ep4_grouped_mtp", "tp2_etp1_ep2_grouped_mtp"),
    ("pp2_vpp_tp2_mtp", "tp1_mtp"),
])
def test_reshard_equals_direct(src_case, dst_case, hf_dirs, tmp_path):
    grid = dict(GRID, tp1_mtp={})
    src = hf_dirs[True]
    main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "a")] + flags(grid[src_case]))
    main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "direct")] + flags(grid[dst_case]))
    assert main(["reshard", "--load-dir", str(tmp_path / "a"), "--save-dir", str(tmp_path / "b")]
                + flags(grid[dst_case])) == 0
    files = sorted(p.relative_to(tmp_path / "direct") for p in (tmp_path / "direct").rglob("model_optim_rng.pt"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("model_optim_rng.pt"))
    for f in files:
        x, y = _load(tmp_path / "direct" / f), _load(tmp_path / "b" / f)
        keys = [k for k in x if k.startswith("model")]
        assert keys == [k for k in y if k.startswith("model")]
        for ck in keys:
            assert list(x[ck]) == list(y[ck]), f
            for k in x[ck]:
                assert x[ck][k].dtype == y[ck][k].dtype and torch.equal(x[ck][k], y[ck][k]), (f, k)
        assert vars(x["args"]) == vars(y["args"])


def test_fused_expert_input(hf_dirs, tmp_path):
    """transformers' in-memory fused expert tensors ([E, 2I, H] gate_up_proj, [E, H, I] down_proj) read as the
    per-expert names."""
    from safetensors.torch import save_file

    hf = read_all(hf_dirs[False])
    fused = {}
    for k, v in hf.items():
        if ".mlp.experts." in k:
            continue
        fused[k] = v
    for layer in range(1, 4):
        p = f"model.layers.{layer}.mlp.experts."
        fused[p + "gate_up_proj"] = torch.stack(
            [torch.cat([hf[p + f"{e}.gate_proj.weight"], hf[p + f"{e}.up_proj.weight"]]) for e in range(8)])
        fused[p + "down_proj"] = torch.stack([hf[p + f"{e}.down_proj.weight"] for e in range(8)])
    d = tmp_path / "fused"
    d.mkdir()
    save_file(fused, str(d / "model.safetensors"))
    (d / "config.json").write_text(open(os.path.join(hf_dirs[False], "config.json")).read())
    assert main(["hf2mcore", "--load-dir", str(d), "--save-dir", str(tmp_path / "mc"), "--target-tensor-parallel-size",
                 "2", "--target-expert-parallel-size", "2", "--no-progress"]) == 0
    main(["mcore2hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out"), "--no-progress"])
    out = read_all(str(tmp_path / "out"))
    assert set(out) == set(hf)
    assert all(torch.equal(out[k], hf[k]) for k in hf)


def test_workers_and_dtype(hf_dirs, tmp_path):
    src = hf_dirs[True]
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "w"), "--target-pipeline-parallel-size",
                 "2", "--target-expert-parallel-size", "2", "--workers", "2", "--bf16"]
                + ["--no-progress"]) == 0
    main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "s"), "--target-pipeline-parallel-size",
          "2", "--target-expert-parallel-size", "2", "--params-dtype", "bf16", "--no-progress"])
    for f in (tmp_path / "s").rglob("model_optim_rng.pt"):
        x, y = _load(f), _load(tmp_path / "w" / f.relative_to(tmp_path / "s"))
        for k, v in x["model"].items():
            assert torch.equal(v, y["model"][k])
            want = torch.float32 if k.endswith("expert_bias") else torch.bfloat16
            assert v.dtype == want, k
    main(["mcore2hf", "--load-dir", str(tmp_path / "w"), "--save-dir", str(tmp_path / "hf"), "--workers", "2",
          "--no-progress"])
    a, b = read_all(src), read_all(str(tmp_path / "hf"))
    for k in a:
        assert torch.equal(b[k], a[k].to(b[k].dtype)), k


def test_checkpoint_file_format(hf_dirs, tmp_path):
    main(["hf2mcore", "--load-dir", hf_dirs[True], "--save-dir", str(tmp_path / "m"), "--target-pipeline-parallel-size",
          "2", "--num-layers-per-virtual-pipeline-stage", "1", "--no-progress"])
    assert (tmp_path / "m/latest_checkpointed_iteration.txt").read_text() == "1"
    for f in ("layout.json", "config.json", "convert.json", "tokenizer.json"):
        assert (tmp_path / "m" / f).is_file(), f
    st = _load(tmp_path / "m/iter_0000001/mp_rank_00_001/model_optim_rng.pt")
    assert st["checkpoint_version"] == 3.0 and st["iteration"] == 1
    assert set(k for k in st if k.startswith("model")) == {"model0", "model1"}
    a = st["args"]
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.num_layers_per_virtual_pipeline_stage) == (1, 2, 1)
    # rank 1 chunk 1 is the last virtual stage: output layer and MTP
    assert "output_layer.weight" in st["model1"] and "mtp.layers.0.enorm.weight" in st["model1"]
    assert "decoder.layers.0.input_layernorm.weight" in st["model0"]
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.partial*"))
