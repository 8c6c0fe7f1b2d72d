"""The name map against the real model: for each layout, every rank's state_dict (keys and shapes, built by
mindspeed_dsv.models.build_model under megatron's parallel_state) equals what hf2mcore writes for that rank."""

import os

import pytest
import torch

from tests.ckpt.helpers import make_hf_dir
from tests.dist_utils import run_distributed

CASES = {
    "tp2_ep2_mtp": dict(world=4, tp=2, pp=1, ep=2),
    "pp3_noop_mtp": dict(world=3, tp=1, pp=3, noop_layers="4,5", num_layers=6),
    "pp2_vpp_tp2_grouped": dict(world=4, tp=2, pp=2, vpp=1, moe_grouped_gemm=True),
}
CUDA_ONLY = "Torch not compiled with CUDA enabled"


def _rank_state(hf_dir, case):
    from megatron.core import parallel_state as ps

    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.platform import init_distributed

    cfg = DeepSeekConfig.from_hf(hf_dir)
    kw = {k: v for k, v in case.items() if k != "world"}
    layout = ParallelLayout(**kw).with_model_defaults(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    chunks = layout.num_model_chunks
    init_distributed(tp=layout.tp, pp=layout.pp, ep=layout.ep, vpp=chunks if chunks > 1 else None)
    out = {}
    for c in range(chunks):
        if chunks > 1:
            ps.set_virtual_pipeline_model_parallel_rank(c)
        model = build_model(cfg, layout, vp_stage=c if chunks > 1 else None)
        out[c] = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    ranks = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
             ps.get_expert_model_parallel_rank())
    return ranks, out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("hf") / "tiny"), mtp=True)


@pytest.mark.parametrize("name", list(CASES))
def test_converter_output_matches_model_state_dict(name, hf_dir, tmp_path):
    from ckpt_convert.cli import main
    from ckpt_convert.mcore_io import rank_file
    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.models import names as nm

    case = CASES[name]
    flags = ["hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "mc"), "--no-progress",
             "--target-tensor-parallel-size", str(case["tp"]), "--target-pipeline-parallel-size", str(case["pp"]),
             "--target-expert-parallel-size", str(case.get("ep", 1))]
    if "vpp" in case:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(case["vpp"])]
    for key in ("num_layer_list", "noop_layers", "num_layers"):
        if key in case:
            flags += ["--" + key.replace("_", "-"), str(case[key])]
    if case.get("moe_grouped_gemm"):
        flags.append("--moe-grouped-gemm")
    assert main(flags) == 0
    layout = ParallelLayout.load(str(tmp_path / "mc"))

    try:
        results = run_distributed(_rank_state, case["world"], hf_dir, case)
    except RuntimeError as e:
        if CUDA_ONLY in str(e) and case["pp"] > 1:
            # megatron's LanguageModule.setup_embeddings_and_output_layer calls weight.data.cuda() with PP > 1;
            # the platform layer (mindspeed_dsv.platform) has to cover it before this layout can be built on CPU.
            pytest.xfail("model cannot be built with PP > 1 on CPU yet (megatron weight.data.cuda())")
        raise
    seen = set()
    for (tp, pp, ep), chunks in results:
        if (tp, pp, ep) in seen:
            continue  # data-parallel replicas
        seen.add((tp, pp, ep))
        state = torch.load(rank_file(str(tmp_path / "mc"), layout, tp, pp, ep), weights_only=False)
        for c, model_shapes in chunks.items():
            written = {k: tuple(v.shape) for k, v in state[nm.chunk_key(layout, c)].items()}
            assert written == model_shapes, (
                f"rank tp{tp} pp{pp} ep{ep} chunk {c}: only in file {sorted(set(written) - set(model_shapes))[:5]}, "
                f"only in model {sorted(set(model_shapes) - set(written))[:5]}, shape diffs "
                f"{[(k, written[k], model_shapes[k]) for k in written if k in model_shapes and written[k] != model_shapes[k]][:5]}")
    assert len(seen) == layout.tp * layout.pp * layout.ep
