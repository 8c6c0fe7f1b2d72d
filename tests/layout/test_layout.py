"""ParallelLayout: placement, numbering, naming, validation, records and the Megatron pipeline layout.

Expected values are written out by hand or computed with the formulas of the reference implementations
(MindSpeed-LLM's converter, Megatron's get_checkpoint_name), never taken from the code under test."""

import argparse
import json

import pytest

from mindspeed_dsv.layout import SHARD_FIELDS, LayoutError, ParallelLayout, add_layout_args


def L(**kw):
    kw.setdefault("first_k_dense_replace", 1)
    return ParallelLayout(**kw).validate()


def all_stages(lay):
    return {(r, c): lay.stage_layers(r, c) for r in range(lay.pp) for c in range(lay.num_model_chunks)}


# ----------------------------------------------------------------------------------- stage_layers
def test_even_split():
    lay = L(pp=4, num_layers=8)
    assert lay.num_model_chunks == 1
    assert all_stages(lay) == {(0, 0): [0, 1], (1, 0): [2, 3], (2, 0): [4, 5], (3, 0): [6, 7]}


def test_num_layer_list():
    lay = L(pp=4, num_layers=61, num_layer_list="15,15,16,15")
    assert lay.stage_layers(0) == list(range(0, 15))
    assert lay.stage_layers(1) == list(range(15, 30))
    assert lay.stage_layers(2) == list(range(30, 46))
    assert lay.stage_layers(3) == list(range(46, 61))


def test_noop_layers_keep_even_split_and_are_marked():
    lay = L(pp=2, num_layers=6, noop_layers=[5])
    assert all_stages(lay) == {(0, 0): [0, 1, 2], (1, 0): [3, 4, 5]}
    assert [lay.is_noop(i) for i in range(6)] == [False] * 5 + [True]


def test_vpp_virtual_stage_blocks():
    # 8 layers, pp 2, 2 layers per virtual stage -> 2 chunks; virtual stage v*pp+r gets block v*pp+r.
    lay = L(pp=2, num_layers=8, vpp=2)
    assert lay.num_model_chunks == 2
    assert all_stages(lay) == {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}


def test_dualpipev_folds_second_half():
    lay = L(pp=2, num_layers=8, dualpipev=True, mtp_num_layers=1)
    assert lay.num_model_chunks == 2
    assert all_stages(lay) == {(0, 0): [0, 1], (0, 1): [6, 7], (1, 0): [2, 3], (1, 1): [4, 5]}
    assert lay.has_embedding(0, 0) and lay.has_output(0, 1) and lay.has_mtp(0, 1)
    assert not lay.has_output(1, 1) and not lay.has_embedding(1, 0) and not lay.has_mtp(1, 0)


def test_dualpipev_a2_pretrain_layout():
    lay = L(tp=4, pp=8, ep=8, num_layers=64, noop_layers="61,62,63", dualpipev=True, mtp_num_layers=1,
            first_k_dense_replace=3, num_experts=256, moe_tp_extend_ep=True)
    assert lay.stage_layers(0, 0) == [0, 1, 2, 3]
    assert lay.stage_layers(0, 1) == [60, 61, 62, 63]
    assert lay.stage_layers(7, 0) == [28, 29, 30, 31]
    assert lay.stage_layers(7, 1) == [32, 33, 34, 35]
    covered = sorted(i for ids in all_stages(lay).values() for i in ids)
    assert covered == list(range(64))


def test_embedding_output_mtp_standard_and_vpp():
    lay = L(pp=3, num_layers=6, mtp_num_layers=1)
    assert [lay.has_embedding(r) for r in range(3)] == [True, False, False]
    assert [lay.has_output(r) for r in range(3)] == [False, False, True]
    assert [lay.has_mtp(r) for r in range(3)] == [False, False, True]
    v = L(pp=2, num_layers=8, vpp=2, mtp_num_layers=0)
    assert v.has_embedding(0, 0) and not v.has_embedding(0, 1)
    assert v.has_output(1, 1) and not v.has_output(1, 0) and not v.has_output(0, 1)
    assert not v.has_mtp(1, 1)


def test_vpp_noop_positions_match_mindspeed_formula():
    # MindSpeed's converter places noop layer i at pp rank  i % (pp*N) // N  and vpp rank  i // N // pp.
    pp, n = 8, 2
    lay = L(tp=2, pp=pp, ep=32, num_layers=64, vpp=n, noop_layers="47,62,63", mtp_num_layers=1,
            first_k_dense_replace=3)
    for i in (47, 62, 63):
        r, c, _ = lay.layer_location(i)
        assert (r, c) == (i % (pp * n) // n, i // n // pp)


# ----------------------------------------------------------------------------------- numbering
def test_hf_layer_index_skips_noops():
    lay = L(pp=2, num_layers=6, noop_layers=[2, 5])
    assert [lay.hf_layer_index(i) for i in range(6)] == [0, 1, None, 2, 3, None]
    assert [lay.global_layer_id(h) for h in range(4)] == [0, 1, 3, 4]


def test_hf_index_a3_tune_layout():
    lay = L(tp=2, pp=16, ep=8, num_layers=64, noop_layers="47,62,63", first_k_dense_replace=3)
    assert lay.hf_layer_index(46) == 46 and lay.hf_layer_index(47) is None
    assert lay.hf_layer_index(48) == 47 and lay.hf_layer_index(61) == 60
    assert lay.hf_layer_index(62) is None and lay.hf_layer_index(63) is None


def test_is_dense_counts_hf_indices():
    lay = L(pp=2, num_layers=6, noop_layers=[0], first_k_dense_replace=2)
    # global 0 is noop; globals 1,2 are HF 0,1 -> dense; global 3 is HF 2 -> MoE.
    assert [lay.is_dense(i) for i in range(6)] == [False, True, True, False, False, False]


# ----------------------------------------------------------------------------------- naming / experts
def megatron_checkpoint_dir(tensor_rank, pipeline_rank, expert_rank, pipeline_parallel, expert_parallel):
    """Transcription of megatron/training/checkpointing.py get_checkpoint_name (Megatron-LM core_r0.16
    line; megatron.training is not shipped in the megatron-core wheel, so it cannot be imported here)."""
    if not pipeline_parallel:
        common = f"mp_rank_{tensor_rank:02d}"
    else:
        common = f"mp_rank_{tensor_rank:02d}_{pipeline_rank:03d}"
    if expert_parallel:
        common = common + f"_{expert_rank:03d}"
    return common


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 1, 1), (1, 4, 1), (1, 1, 8), (2, 1, 4), (2, 8, 16), (4, 2, 1)])
def test_rank_dir_name_matches_megatron(tp, pp, ep):
    lay = ParallelLayout(tp=tp, pp=pp, ep=ep, num_layers=8 * pp)
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                assert lay.rank_dir_name(t, p, e) == megatron_checkpoint_dir(t, p, e, pp > 1, ep > 1)


def test_rank_dir_name_examples():
    assert ParallelLayout(tp=2, pp=1, ep=4, num_layers=4).rank_dir_name(1, 0, 3) == "mp_rank_01_003"
    assert ParallelLayout(tp=2, pp=8, ep=16, num_layers=64).rank_dir_name(1, 7, 15) == "mp_rank_01_007_015"
    with pytest.raises(LayoutError, match="tp rank 2"):
        ParallelLayout(tp=2, num_layers=4).rank_dir_name(2, 0, 0)


def test_local_experts_plain_and_tp_extend_ep():
    lay = L(tp=2, ep=4, num_layers=4, num_experts=16)
    assert lay.local_experts(1) == [4, 5, 6, 7]
    assert lay.local_experts(1, tp_rank=1) == [4, 5, 6, 7]  # TP splits each expert, not the set
    ext = L(tp=2, ep=4, num_layers=4, num_experts=16, moe_tp_extend_ep=True)
    # MindSpeed: experts chunked into ep*tp groups, group index ep_rank*tp + tp_rank.
    assert ext.local_experts(0, 0) == [0, 1] and ext.local_experts(0, 1) == [2, 3]
    assert ext.local_experts(3, 1) == [14, 15]
    everyone = sorted(x for e in range(4) for t in range(2) for x in ext.local_experts(e, t))
    assert everyone == list(range(16))
    assert ext.expert_tp == 1 and lay.expert_tp == 2


# ----------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw,flags", [
    (dict(pp=4, num_layers=61, num_layer_list="15,15,16"), ["--num-layer-list", "--pipeline-model-parallel-size"]),
    (dict(pp=4, num_layers=61, num_layer_list="15,15,16,16"), ["--num-layer-list", "--num-layers", "62"]),
    (dict(pp=2, num_layers=8, num_layer_list="4,4", vpp=2), ["--num-layer-list", "--num-layers-per-virtual-pipeline-stage"]),
    (dict(pp=2, num_layers=8, num_layer_list="4,4", noop_layers="7"), ["--num-layer-list", "--noop-layers"]),
    (dict(pp=3, num_layers=8, vpp=2), ["--num-layers", "--num-layers-per-virtual-pipeline-stage", "6"]),
    (dict(pp=2, num_layers=6, vpp=2), ["--num-layers", "4"]),
    (dict(pp=1, num_layers=6, vpp=2), ["--num-layers-per-virtual-pipeline-stage", "--pipeline-model-parallel-size"]),
    (dict(pp=3, num_layers=8), ["--num-layers", "--pipeline-model-parallel-size"]),
    (dict(ep=3, num_layers=4, num_experts=8), ["--expert-model-parallel-size", "3", "--num-experts", "8"]),
    (dict(tp=2, ep=4, num_layers=4, num_experts=4, moe_tp_extend_ep=True), ["--moe-tp-extend-ep", "8"]),
    (dict(pp=2, num_layers=8, noop_layers="8"), ["--noop-layers", "[8]"]),
    (dict(pp=2, num_layers=8, noop_layers="-1"), ["--noop-layers"]),
    (dict(pp=2, num_layers=8, noop_layers="3,3"), ["--noop-layers", "duplicate"]),
    (dict(pp=3, num_layers=9, dualpipev=True), ["dualpipev", "--num-layers", "6"]),
    (dict(pp=2, num_layers=8, dualpipev=True, vpp=2), ["dualpipev", "--num-layers-per-virtual-pipeline-stage"]),
    (dict(tp=0, num_layers=4), ["--tensor-model-parallel-size"]),
    (dict(num_layers=None), ["--num-layers"]),
    (dict(pp=2, num_layers=8, noop_layers="a,b"), ["--noop-layers", "'a,b'"]),
])
def test_validate_names_the_flag(kw, flags):
    with pytest.raises(LayoutError) as exc:
        ParallelLayout(**kw).validate()
    for f in flags:
        assert f in str(exc.value), (f, str(exc.value))


@pytest.mark.parametrize("kw,cfg_over,flags", [
    (dict(tp=3), {}, ["--tensor-model-parallel-size", "num_attention_heads"]),
    (dict(num_layers=62), {}, ["--num-layers", "num_hidden_layers", "61"]),
    (dict(num_layers=64, noop_layers="61,62"), {}, ["--num-layers", "--noop-layers", "62"]),
    (dict(ep=3), {}, ["--expert-model-parallel-size", "3", "256"]),
    (dict(num_experts=128), {}, ["--num-experts", "128", "256"]),
    (dict(mtp_num_layers=2), {}, ["--mtp-num-layers", "num_nextn_predict_layers"]),
    (dict(first_k_dense_replace=4), {}, ["--first-k-dense-replace", "4"]),
])
def test_validate_against_config_names_the_flag(cfg671, kw, cfg_over, flags):
    cfg = dict(cfg671, **cfg_over)
    with pytest.raises(LayoutError) as exc:
        ParallelLayout(**kw).with_model_defaults(cfg).validate_against(cfg)
    for f in flags:
        assert f in str(exc.value), (f, str(exc.value))


def test_vocab_padding_follows_megatron(cfg671):
    """Megatron's _vocab_size_with_padding: round up to a multiple of make_vocab_size_divisible_by * TP."""
    cfg = dict(cfg671, vocab_size=129281)
    lay = ParallelLayout(tp=4).with_model_defaults(cfg).validate_against(cfg)  # padded, no longer refused
    assert lay.padded_vocab_size(129281) == 129284
    assert ParallelLayout(tp=4, make_vocab_size_divisible_by=128).padded_vocab_size(129281) == 129536
    assert ParallelLayout(tp=2).padded_vocab_size(509) == 510
    assert ParallelLayout(tp=8).padded_vocab_size(129280) == 129280  # today's layouts: nothing added
    with pytest.raises(LayoutError, match="--make-vocab-size-divisible-by must be a positive integer"):
        ParallelLayout(make_vocab_size_divisible_by=0).with_model_defaults(cfg).validate()


def test_runtime_checks(cfg671):
    lay = ParallelLayout(tp=2, pp=8, ep=16).with_model_defaults(cfg671)
    with pytest.raises(LayoutError, match="--sequence-parallel"):
        lay.validate_runtime()
    lay.sequence_parallel = True
    assert lay.data_parallel_size(512) == 32 and lay.expert_data_parallel_size(512) == 2
    with pytest.raises(LayoutError, match="world size 500"):
        lay.validate_runtime(world_size=500)
    # TP*PP divides 256, but the expert groups need TP*EP*PP = 2*32*8 = 512 ranks.
    with pytest.raises(LayoutError, match="world size 256 .*--expert-model-parallel-size.* = 512"):
        ParallelLayout(tp=2, pp=8, ep=32, num_layers=64).data_parallel_size(256)


def test_with_model_defaults(cfg671):
    lay = ParallelLayout(noop_layers="61,62,63").with_model_defaults(cfg671)
    assert (lay.num_layers, lay.mtp_num_layers, lay.first_k_dense_replace, lay.num_experts) == (64, 1, 3, 256)
    kept = ParallelLayout(mtp_num_layers=0, num_layers=61).with_model_defaults(cfg671)
    assert kept.mtp_num_layers == 0 and kept.num_layers == 61


# ----------------------------------------------------------------------------------- records
def test_layout_json_round_trip_and_diff(tmp_path):
    lay = L(tp=2, pp=2, ep=2, num_layers=8, vpp=2, noop_layers="7", mtp_num_layers=1, num_experts=8,
            moe_grouped_gemm=True)
    path = lay.save(tmp_path)
    record = json.loads(open(path).read())
    assert record["layout_version"] == 1
    assert record["layout"]["noop_layers"] == [7] and record["layout"]["vpp"] == 2
    assert record["stages"]["pp1_chunk1"] == [6, 7]
    assert not [p for p in tmp_path.iterdir() if p.name != "layout.json"]  # temp file renamed away
    back = ParallelLayout.load(tmp_path)
    assert back == lay and back.diff(lay) == []

    other = ParallelLayout.from_dict(dict(lay.to_dict(), tp=4, moe_grouped_gemm=False, sequence_parallel=True))
    d = lay.diff(other)
    assert len(d) == 3
    assert any(x.startswith("--tensor-model-parallel-size (tp): 2 != 4") for x in d)
    assert any("--moe-grouped-gemm" in x for x in d) and any("--sequence-parallel" in x for x in d)
    # sequence parallel does not change shards: the checkpoint check only reports shard fields.
    assert "sequence_parallel" not in SHARD_FIELDS
    with pytest.raises(LayoutError, match="layout differs from the flags") as exc:
        other.check_checkpoint(lay)
    assert "--tensor-model-parallel-size" in str(exc.value) and "--sequence-parallel" not in str(exc.value)


def test_load_errors(tmp_path):
    with pytest.raises(LayoutError, match="no layout record"):
        ParallelLayout.load(tmp_path)
    (tmp_path / "layout.json").write_text(json.dumps({"layout_version": 1, "layout": {"tp": 1, "bogus": 2}}))
    with pytest.raises(LayoutError, match="bogus"):
        ParallelLayout.load(tmp_path)


# ----------------------------------------------------------------------------------- argparse
def test_trainer_and_converter_flags_from_one_place():
    trainer, conv = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_layout_args(trainer)
    add_layout_args(conv, prefix="target-")
    common = ["--num-layers", "64", "--noop-layers", "61,62,63", "--schedules-method", "dualpipev",
              "--moe-tp-extend-ep", "--mtp-num-layers", "1", "--num-experts", "256"]
    a = ParallelLayout.from_args(trainer.parse_args(
        ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "8",
         "--expert-model-parallel-size", "16"] + common))
    b = ParallelLayout.from_args(conv.parse_args(
        ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "8",
         "--target-expert-parallel-size", "16"] + common))
    assert a == b
    assert (a.tp, a.pp, a.ep, a.noop_layers, a.dualpipev, a.moe_tp_extend_ep) == (2, 8, 16, [61, 62, 63], True, True)
    helps = {}
    for p in (trainer, conv):
        for act in p._actions:
            if act.option_strings:
                helps.setdefault(act.option_strings[0].replace("target-", "").replace("-model-", "-"), set()).add(act.help)
    assert all(len(h) == 1 for h in helps.values()), helps


def test_from_args_explicit_prefix():
    ns = argparse.Namespace(source_tensor_parallel_size=2, target_tensor_parallel_size=4, num_layers=8)
    assert ParallelLayout.from_args(ns, prefix="source").tp == 2
    assert ParallelLayout.from_args(ns, prefix="target-").tp == 4


# ----------------------------------------------------------------------------------- megatron layout
def _megatron_layout_check(lay):
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    raw = lay.to_megatron_pp_layout()
    for form in (raw, lay.to_megatron_pp_layout_str()):
        mpl = PipelineParallelLayerLayout(form, lay.pp)
        mpl.validate_layer_layout(num_layers=lay.num_layers, mtp_num_layers=lay.mtp_num_layers or None)
        assert mpl.virtual_pipeline_model_parallel_size == lay.num_model_chunks
        prev = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        parallel_state.set_virtual_pipeline_model_parallel_world_size(
            lay.num_model_chunks if lay.num_model_chunks > 1 else None)
        try:
            for r in range(lay.pp):
                for c in range(lay.num_model_chunks):
                    got = mpl.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=c, pp_rank=r)
                    assert got == lay.stage_layers(r, c), (r, c)
                    assert (mpl.layout[r][c].count(LayerType.embedding) == 1) == lay.has_embedding(r, c)
                    assert (mpl.layout[r][c].count(LayerType.loss) == 1) == lay.has_output(r, c)
                    assert mpl.layout[r][c].count(LayerType.mtp) == (lay.mtp_num_layers if lay.has_mtp(r, c) else 0)
        finally:
            parallel_state.set_virtual_pipeline_model_parallel_world_size(prev)


@pytest.mark.parametrize("kw", [
    dict(pp=1, num_layers=4, mtp_num_layers=1),
    dict(pp=4, num_layers=61, num_layer_list="15,15,16,15", mtp_num_layers=0),
    dict(pp=8, num_layers=61, num_layer_list="7,7,7,8,8,8,8,8", mtp_num_layers=1),
    dict(pp=16, num_layers=64, noop_layers="47,62,63", mtp_num_layers=1),
    dict(pp=8, num_layers=64, vpp=2, noop_layers="47,62,63", mtp_num_layers=1),
    dict(pp=2, num_layers=8, vpp=2, mtp_num_layers=0),
])
def test_megatron_accepts_pp_layout(kw):
    lay = L(**kw)
    _megatron_layout_check(lay)


def test_megatron_layout_string_and_dualpipev():
    assert L(pp=2, num_layers=4, mtp_num_layers=1).to_megatron_pp_layout_str() == "Ett|ttmL"
    assert L(pp=2, num_layers=8, vpp=2).to_megatron_pp_layout_str() == "Ett|tt|tt|ttL"
    with pytest.raises(LayoutError, match="dualpipev has no Megatron string layout"):
        L(pp=2, num_layers=8, dualpipev=True).to_megatron_pp_layout_str()


@pytest.mark.parametrize("kw", [
    dict(pp=2, num_layers=8, noop_layers="5,6,7", mtp_num_layers=1),
    dict(pp=8, num_layers=64, noop_layers="61,62,63", mtp_num_layers=1),
    dict(pp=4, num_layers=8, mtp_num_layers=0),
])
def test_dualpipev_megatron_layout_numbers_the_v(kw):
    """megatron, through DualPipeVLayerLayout, builds on (rank, chunk) the layers our layout puts there, with
    the embedding on rank 0 chunk 0 and the loss and MTP on rank 0 chunk 1."""
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import LayerType

    from mindspeed_dsv.models.builder import DualPipeVLayerLayout

    lay = L(dualpipev=True, **kw)
    mpl = DualPipeVLayerLayout(lay.to_megatron_pp_layout(), lay.pp)
    mpl.validate_layer_layout(num_layers=lay.num_layers, mtp_num_layers=lay.mtp_num_layers or None)
    prev = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    parallel_state.set_virtual_pipeline_model_parallel_world_size(2)
    try:
        for r in range(lay.pp):
            for c in range(2):
                assert mpl.get_layer_id_list(LayerType.decoder, vp_stage=c, pp_rank=r) == lay.stage_layers(r, c)
                assert mpl.layout[r][c].count(LayerType.embedding) == (r == 0 and c == 0)
                assert mpl.layout[r][c].count(LayerType.loss) == (r == 0 and c == 1)
                assert mpl.layout[r][c].count(LayerType.mtp) == (kw["mtp_num_layers"] if (r, c) == (0, 1) else 0)
    finally:
        parallel_state.set_virtual_pipeline_model_parallel_world_size(prev)
    assert lay.stage_layers(0, 1) == list(range(lay.num_layers - lay.num_layers // (2 * lay.pp), lay.num_layers))


def test_docs_cover_every_layout_flag_in_both_languages():
    import os

    parser = argparse.ArgumentParser()
    add_layout_args(parser)
    conv = argparse.ArgumentParser()
    add_layout_args(conv, prefix="target-")
    flags = {o for p in (parser, conv) for a in p._actions for o in a.option_strings if o.startswith("--")}
    flags.discard("--help")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for lang in ("en", "zh"):
        text = open(os.path.join(root, "docs", lang, "layouts.md"), encoding="utf-8").read()
        missing = sorted(f for f in flags if f not in text)
        assert not missing, (lang, missing)
