"""The name map against the real model: for each layout, every rank's state_dict (keys and shapes, built by
mindspeed_dsv.models.build_model under megatron's parallel_state) equals what hf2mcore writes for that rank.

Spawning ranks is the expensive part on CPU (each process imports torch + megatron), so one gloo world of 4
ranks builds the model for every layout below in turn, re-initialising megatron's parallel groups between
layouts; each test then compares one layout. dualpipev is layout-only (the model builder cannot build it) and
is covered by the round-trip tests instead.
"""

import pytest
import torch

from tests.ckpt.helpers import make_hf_dir
from tests.dist_utils import run_distributed

WORLD = 4
CASES = {
    # TP x EP with MTP, per-expert linears; two data-parallel replicas
    "tp2_ep2_mtp": dict(tp=2, pp=1, ep=2),
    # uneven stages (1 + 3 layers), EP over the pipeline's data-parallel ranks, MTP on the last stage
    "pp2_ep2_layer_list_mtp": dict(tp=1, pp=2, ep=2, num_layer_list="1,3"),
    # four stages padded with noop layers: the last stage holds only noop layers, the output layer and MTP
    "pp4_noop_mtp": dict(tp=1, pp=4, ep=1, noop_layers="3,5,6,7", num_layers=8),
    # interleaved virtual pipeline (2 chunks per rank) with TP and grouped-GEMM experts
    "pp2_vpp_tp2_grouped_mtp": dict(tp=2, pp=2, ep=1, vpp=1, moe_grouped_gemm=True),
    # experts split whole over TP*EP
    "tp2_ep2_tp_extend_ep_grouped": dict(tp=2, pp=1, ep=2, moe_tp_extend_ep=True, moe_grouped_gemm=True),
}


def _all_states(hf_dir, cases):
    """On one rank: the state_dict shapes of this rank's model chunk(s) for every layout in `cases`."""
    from megatron.core import parallel_state as ps

    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.platform import init_distributed

    cfg = DeepSeekConfig.from_hf(hf_dir)
    out = {}
    for name, case in cases.items():
        layout = ParallelLayout(**case).with_model_defaults(cfg)
        chunks = layout.num_model_chunks
        etp = 1 if layout.moe_tp_extend_ep else None
        ep = layout.ep * layout.tp if layout.moe_tp_extend_ep else layout.ep
        init_distributed(tp=layout.tp, pp=layout.pp, ep=ep, etp=etp, vpp=chunks if chunks > 1 else None)
        shapes = {}
        for c in range(chunks):
            if chunks > 1:
                ps.set_virtual_pipeline_model_parallel_rank(c)
            model = build_model(cfg, layout, vp_stage=c if chunks > 1 else None)
            shapes[c] = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
            del model
        ranks = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                 ps.get_expert_model_parallel_rank() // (layout.tp if layout.moe_tp_extend_ep else 1))
        out[name] = (ranks, shapes)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("hf") / "tiny"), mtp=True)


@pytest.fixture(scope="module")
def model_states(hf_dir):
    """{case: [(tp, pp, ep) ranks, {chunk: {key: shape}}] per world rank}, from one spawned world."""
    per_rank = run_distributed(_all_states, WORLD, hf_dir, CASES)
    return {name: [r[name] for r in per_rank] for name in CASES}


def _convert(hf_dir, case, save_dir):
    from ckpt_convert.cli import main

    flags = ["hf2mcore", "--load-dir", hf_dir, "--save-dir", save_dir, "--no-progress",
             "--target-tensor-parallel-size", str(case["tp"]), "--target-pipeline-parallel-size", str(case["pp"]),
             "--target-expert-parallel-size", str(case["ep"])]
    if "vpp" in case:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(case["vpp"])]
    for key in ("num_layer_list", "noop_layers", "num_layers"):
        if key in case:
            flags += ["--" + key.replace("_", "-"), str(case[key])]
    for key in ("moe_grouped_gemm", "moe_tp_extend_ep"):
        if case.get(key):
            flags.append("--" + key.replace("_", "-"))
    assert main(flags) == 0


@pytest.mark.parametrize("name", list(CASES))
def test_converter_output_matches_model_state_dict(name, hf_dir, model_states, tmp_path):
    from ckpt_convert.mcore_io import rank_file
    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.models import names as nm

    _convert(hf_dir, CASES[name], str(tmp_path / "mc"))
    layout = ParallelLayout.load(str(tmp_path / "mc"))
    seen = set()
    for (tp, pp, ep), chunks in model_states[name]:
        if (tp, pp, ep) in seen:
            continue  # data-parallel replicas
        seen.add((tp, pp, ep))
        state = torch.load(rank_file(str(tmp_path / "mc"), layout, tp, pp, ep), weights_only=False)
        assert sorted(k for k in state if k.startswith("model")) == sorted(nm.chunk_key(layout, c) for c in chunks)
        for c, model_shapes in chunks.items():
            written = {k: tuple(v.shape) for k, v in state[nm.chunk_key(layout, c)].items()}
            assert written == model_shapes, (
                f"rank tp{tp} pp{pp} ep{ep} chunk {c}: only in file {sorted(set(written) - set(model_shapes))[:5]}, "
                f"only in model {sorted(set(model_shapes) - set(written))[:5]}, shape diffs "
                f"{[(k, written[k], model_shapes[k]) for k in written if k in model_shapes and written[k] != model_shapes[k]][:5]}")
    assert len(seen) == layout.tp * layout.pp * layout.ep
