"""MindSpeed-LLM checkpoints in and out (ckpt_convert mindspeed2mcore / mindspeed2hf / mcore2mindspeed).

Their rank files come from tests/ckpt/mindspeed_writer.py, written from the documented format without our name map.
Reading them must give rank files bit-identical to hf2mcore's for the same layout; writing ours back must give
their files bit for bit; and the HF export equals the HF source."""

import argparse
import json
import math
import os

import pytest
import torch

from ckpt_convert.cli import main
from ckpt_convert.hf_io import read_all, read_config
from mindspeed_dsv.peft.nf4 import bitsandbytes_available
from tests.ckpt.helpers import make_hf_dir
from tests.ckpt.mindspeed_writer import write_mindspeed

CASES = {
    "tp2_mtp": dict(tp=2, mtp_num_layers=1),
    "pp2_vpp_mla_mm_split_mtp": dict(pp=2, vpp=1, mm_split=True, mtp_num_layers=1),
    "ep2_grouped_mtp": dict(ep=2, grouped=True, mtp_num_layers=1),
    "dualpipev_pp2_noop_mtp": dict(pp=2, dualpipev=True, noop_layers=(4, 5, 6, 7), num_layers=8, ep=2, grouped=True,
                                   mtp_num_layers=1),
    "tp2_ep2_extend_ep": dict(tp=2, ep=2, tp_extend_ep=True, grouped=True, mtp_num_layers=0),
    # their master A2 template's expert layout (TP4 EP32 --expert-tensor-parallel-size 1), tiny
    "tp2_ep2_etp1_grouped_mtp": dict(tp=2, ep=2, expert_tp=1, grouped=True, mtp_num_layers=1),
    "tp2_ep4_etp1_pp2": dict(tp=2, ep=4, pp=2, expert_tp=1, mtp_num_layers=1),
}


def layout_flags(case, prefix):
    f = [f"--{prefix}-tensor-parallel-size", str(case.get("tp", 1)), f"--{prefix}-pipeline-parallel-size",
         str(case.get("pp", 1)), f"--{prefix}-expert-parallel-size", str(case.get("ep", 1)),
         "--mtp-num-layers", str(case.get("mtp_num_layers", 0))]
    if case.get("vpp"):
        f += ["--num-layers-per-virtual-pipeline-stage", str(case["vpp"])]
    if case.get("noop_layers"):
        f += ["--noop-layers", ",".join(map(str, case["noop_layers"])), "--num-layers", str(case["num_layers"])]
    if case.get("dualpipev"):
        f += ["--schedules-method", "dualpipev"]
    if case.get("grouped"):
        f.append("--moe-grouped-gemm")
    if case.get("tp_extend_ep"):
        f.append("--moe-tp-extend-ep")
    if case.get("expert_tp"):
        f += [f"--{prefix}-expert-tensor-parallel-size", str(case["expert_tp"])]
    if case.get("mm_split"):
        f.append("--mla-mm-split")
    return f


def rank_files(root):
    """{relative path of each rank file: its state} under the latest iteration."""
    it = open(os.path.join(root, "latest_checkpointed_iteration.txt")).read().strip()
    idir = os.path.join(root, f"iter_{int(it):07d}")
    return {d: torch.load(os.path.join(idir, d, "model_optim_rng.pt"), weights_only=False)
            for d in sorted(os.listdir(idir)) if d.startswith("mp_rank_")}


def assert_same_models(a, b):
    assert set(a) == set(b), (sorted(a), sorted(b))
    for rank in a:
        ka = sorted(k for k in a[rank] if k.startswith("model"))
        assert ka == sorted(k for k in b[rank] if k.startswith("model")), rank
        for ck in ka:
            sa, sb = a[rank][ck], b[rank][ck]
            assert set(sa) == set(sb), (rank, ck, sorted(set(sa) ^ set(sb)))
            for name in sa:
                assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), (rank, ck, name)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("hf") / "mtp"), mtp=True)


@pytest.mark.parametrize("name", list(CASES))
def test_read_theirs_equals_hf2mcore_and_write_back(name, hf_dir, tmp_path):
    case = CASES[name]
    cfg = read_config(hf_dir)
    theirs = str(tmp_path / "theirs")
    write_mindspeed(hf_dir, theirs, cfg, **case)  # their converter's output: no saved args
    assert main(["mindspeed2mcore", "--load-dir", theirs, "--model-config", hf_dir, "--save-dir",
                 str(tmp_path / "ours"), "--no-progress"] + layout_flags(case, "source")) == 0
    unused = [] if case.get("mtp_num_layers") else ["--allow-unused-weights"]  # the HF model has an MTP layer
    assert main(["hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "direct"), "--no-progress"]
                + layout_flags(case, "target") + unused) == 0
    direct = rank_files(str(tmp_path / "direct"))
    assert_same_models(rank_files(str(tmp_path / "ours")), direct)
    if case.get("expert_tp") == 1:  # the files of megatron's ranks: lcm(TP, EP) per stage, not TP x EP
        assert len(direct) == case.get("pp", 1) * math.lcm(case["tp"], case["ep"]) < case["tp"] * case["ep"] * case.get(
            "pp", 1)

    # ours -> theirs: their files, bit for bit; the saved args carry the layout, so no flags are needed to read back
    assert main(["mcore2mindspeed", "--load-dir", str(tmp_path / "direct"), "--save-dir", str(tmp_path / "back"),
                 "--no-progress"]) == 0
    assert_same_models(rank_files(str(tmp_path / "back")), rank_files(theirs))
    assert main(["mindspeed2mcore", "--load-dir", str(tmp_path / "back"), "--model-config", hf_dir, "--save-dir",
                 str(tmp_path / "again"), "--no-progress"]) == 0
    assert_same_models(rank_files(str(tmp_path / "again")), direct)


def test_mindspeed2hf_equals_source_and_relayout(hf_dir, tmp_path, capsys, monkeypatch):
    case = CASES["dualpipev_pp2_noop_mtp"]
    theirs = str(tmp_path / "theirs")
    write_mindspeed(hf_dir, theirs, read_config(hf_dir), **case)

    def no_rank_files(*args, **kwargs):
        raise AssertionError("mindspeed2hf wrote a rank file (a staging copy)")

    with monkeypatch.context() as m:  # one pass: no rank file of ours is written on the way
        m.setattr("ckpt_convert.mcore_io.save_rank_file", no_rank_files)
        m.setattr("ckpt_convert.mindspeed.save_rank_file", no_rank_files)
        assert main(["mindspeed2hf", "--load-dir", theirs, "--model-config", hf_dir, "--save-dir", str(tmp_path / "hf"),
                     "--no-progress"] + layout_flags(case, "source")) == 0
    a, b = read_all(hf_dir), read_all(str(tmp_path / "hf"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # worker processes rebuild the same MindSpeed reader from the spec and write the same bytes
    assert main(["mindspeed2hf", "--load-dir", theirs, "--model-config", hf_dir, "--save-dir", str(tmp_path / "hf2"),
                 "--no-progress", "--workers", "2"] + layout_flags(case, "source")) == 0
    c = read_all(str(tmp_path / "hf2"))
    assert set(c) == set(a) and all(torch.equal(a[k], c[k]) for k in a)
    # To another layout in one step (dualpipev PP2 EP2 + noop -> one rank, no pipeline): equals hf2mcore's, and its
    # logits equal transformers' on the HF model (verify).
    target = dict(mtp_num_layers=1)
    assert main(["mindspeed2mcore", "--load-dir", theirs, "--model-config", hf_dir, "--save-dir",
                 str(tmp_path / "relaid"), "--no-progress", "--target-expert-parallel-size", "1",
                 "--target-pipeline-parallel-size", "1", "--target-schedules-method", "none", "--target-noop-layers",
                 "", "--target-num-layers", "4"] + layout_flags(case, "source")) == 0
    assert main(["hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "direct"), "--no-progress",
                 "--moe-grouped-gemm"] + layout_flags(target, "target")) == 0
    assert_same_models(rank_files(str(tmp_path / "relaid")), rank_files(str(tmp_path / "direct")))
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(3))
    (tmp_path / "tokens.json").write_text(json.dumps(ids.tolist()))
    capsys.readouterr()
    assert main(["verify", "--hf-dir", hf_dir, "--mcore-dir", str(tmp_path / "relaid"), "--tokens-file",
                 str(tmp_path / "tokens.json")]) == 0
    stats = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert stats["relative"] < 1e-5, stats


@pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes writes the NF4 fixture")
def test_qlora_nf4_weights_are_dequantized(hf_dir, tmp_path):
    """Their --qlora-nf4 checkpoint: each NF4 weight reads back as code[q] * (code2[q2] * absmax2 + offset) of the
    stored bytes (written out here from bitsandbytes' entries, not with our NF4 code); the rest bit-identical to
    hf2mcore's."""
    cfg = read_config(hf_dir)
    theirs = str(tmp_path / "theirs")
    write_mindspeed(hf_dir, theirs, cfg, mtp_num_layers=1, nf4_modules=("linear_proj", "linear_fc2"))
    assert main(["mindspeed2mcore", "--load-dir", theirs, "--model-config", hf_dir, "--save-dir",
                 str(tmp_path / "ours"), "--no-progress", "--mtp-num-layers", "1"]) == 0
    assert main(["hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "direct"), "--no-progress"]) == 0
    ours, direct = rank_files(str(tmp_path / "ours"))["mp_rank_00"]["model"], \
        rank_files(str(tmp_path / "direct"))["mp_rank_00"]["model"]
    stored = rank_files(theirs)["mp_rank_00"]["model"]
    code = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                         -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                         0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                         0.7229568362236023, 1.0])  # NF4's code book (the QLoRA paper)
    quantized = [k for k in stored if k.endswith(".weight") and k + ".absmax" in stored]
    # linear_proj of 4 layers + MTP; linear_fc2 of the dense MLP, 4 shared experts and 8 routed experts x 4 MoE layers
    assert len(quantized) == 5 + 1 + 4 + 8 * 4
    for key in ours:
        if key not in quantized:
            assert torch.equal(ours[key], direct[key]), key
            continue
        meta = json.loads(bytes(stored[key + ".quant_state.bitsandbytes__nf4"].tolist()))
        p = stored[key].reshape(-1).long()
        q = torch.stack([p >> 4, p & 15], 1).reshape(-1)[: direct[key].numel()]
        q2 = stored[key + ".absmax"].long()
        scale = (stored[key + ".nested_quant_map"][q2] * stored[key + ".nested_absmax"][torch.arange(q2.numel()) // 256]
                 + meta["nested_offset"])
        want = (code[q].view(-1, 64) * scale.view(-1, 1)).reshape(direct[key].shape).to(direct[key].dtype)
        assert torch.equal(ours[key], want), key
        # and it is the weight: within NF4's error of the HF tensor (half the widest code gap, 0.139, of each
        # block's absmax, plus the nested absmax's own rounding: 0.155 seen)
        err = (ours[key] - direct[key]).abs().reshape(-1, 64)
        assert bool((err <= 0.2 * direct[key].abs().reshape(-1, 64).amax(1, keepdim=True)).all()), key


def test_layout_from_saved_args(hf_dir, tmp_path):
    case = CASES["pp2_vpp_mla_mm_split_mtp"]
    args = argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=2,
                              expert_model_parallel_size=1, num_layers_per_virtual_pipeline_stage=1, num_layers=4,
                              mtp_num_layers=1, mla_mm_split=True, noop_layers=None, schedules_method=None,
                              moe_grouped_gemm=False)
    theirs = str(tmp_path / "theirs")
    write_mindspeed(hf_dir, theirs, read_config(hf_dir), iteration=2000, save_args=args, **case)
    assert main(["mindspeed2mcore", "--load-dir", theirs, "--model-config", hf_dir, "--save-dir",
                 str(tmp_path / "ours"), "--no-progress"]) == 0
    assert main(["hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "direct"), "--no-progress"]
                + layout_flags(case, "target")) == 0
    assert_same_models(rank_files(str(tmp_path / "ours")), rank_files(str(tmp_path / "direct")))


def test_clear_errors(hf_dir, tmp_path, capsys):
    cfg = read_config(hf_dir)
    theirs = str(tmp_path / "theirs")
    write_mindspeed(hf_dir, theirs, cfg, tp=2, mtp_num_layers=1)
    # wrong source TP (1 for a TP2 checkpoint): refused by the rank directories it holds
    assert main(["mindspeed2mcore", "--load-dir", theirs, "--model-config", hf_dir, "--save-dir",
                 str(tmp_path / "o1"), "--mtp-num-layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "not in the layout ['mp_rank_01']" in err and "--source-tensor" in err
    # ... and by tensor shapes where the files happen to match (one rank file read as a TP2 layout's rank 0)
    from ckpt_convert.mindspeed import MindSpeedCheckpointError, _check_keys, chunk_to_ours
    from mindspeed_dsv.layout import ParallelLayout

    state = torch.load(os.path.join(theirs, "iter_0000001", "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    tp1 = ParallelLayout(mtp_num_layers=1).with_model_defaults(cfg)
    with pytest.raises(MindSpeedCheckpointError, match=r"linear_fc1.weight: shape \[256, 128\], "
                                                       r"this layout needs \[512, 128\]"):
        _check_keys(chunk_to_ours(state["model"], cfg, "x"), cfg, tp1, 0, 0, 0, 0, False, "x")
    # MTP flag missing: their MTP keys are unknown to a layout without MTP, named with the layout expected
    assert main(["mindspeed2mcore", "--load-dir", theirs, "--model-config", hf_dir, "--save-dir",
                 str(tmp_path / "o2"), "--source-tensor-parallel-size", "2", "--mtp-num-layers", "0"]) == 2
    err = capsys.readouterr().err
    assert "unknown key mtp.layers.0.enorm.weight" in err and "mtp=0" in err and "mp_rank_00" in err
    # an unknown tensor in their file
    path = os.path.join(theirs, "iter_0000001", "mp_rank_01", "model_optim_rng.pt")
    state = torch.load(path, weights_only=False)
    state["model"]["decoder.layers.0.self_attention.linear_qkv.bias"] = torch.zeros(3)
    torch.save(state, path)
    assert main(["mindspeed2mcore", "--load-dir", theirs, "--model-config", hf_dir, "--save-dir",
                 str(tmp_path / "o3"), "--source-tensor-parallel-size", "2", "--mtp-num-layers", "1"]) == 2
    assert "unknown key decoder.layers.0.self_attention.linear_qkv.bias" in capsys.readouterr().err
    # no config.json: say which flag gives it
    assert main(["mindspeed2mcore", "--load-dir", theirs, "--save-dir", str(tmp_path / "o4")]) == 2
    assert "--model-config" in capsys.readouterr().err
    # nothing half-written was left behind
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize("workers", [1, 2])
def test_mcore2mindspeed_to_another_layout_equals_their_files(workers, hf_dir, tmp_path, monkeypatch):
    """Ours at EP2 -> theirs at TP2 EP2 expert-TP 1 (their A2 template's expert layout) in one step: their files for
    that layout bit for bit, written in one pass (no rank file of ours on the way, checked in the serial run)."""
    src, dst = CASES["ep2_grouped_mtp"], CASES["tp2_ep2_etp1_grouped_mtp"]
    assert main(["hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "ours"), "--no-progress"]
                + layout_flags(src, "target")) == 0
    theirs = str(tmp_path / "theirs")
    write_mindspeed(hf_dir, theirs, read_config(hf_dir), **dst)
    import ckpt_convert.hf2mcore as h2m

    def no_resharded_copy(*args, **kwargs):
        raise AssertionError("mcore2mindspeed wrote a resharded checkpoint of ours (a staging copy)")

    with monkeypatch.context() as m:
        m.setattr(h2m, "write_mcore", no_resharded_copy)
        assert main(["mcore2mindspeed", "--load-dir", str(tmp_path / "ours"), "--save-dir", str(tmp_path / "back"),
                     "--no-progress", "--workers", str(workers), "--target-tensor-parallel-size", "2",
                     "--target-expert-tensor-parallel-size", "1"]) == 0
    assert_same_models(rank_files(str(tmp_path / "back")), rank_files(theirs))
