"""DeepSeek-V4 pipeline layouts change nothing numerically: from the same weights (one converted tiny V4 HF model),
data and seed, PP2 1F1B, PP2 + VPP, PP2 dualpipev and EP2 give PP1's loss at every step and PP1's gradient for
every parameter before clipping (fp32, cpu/gloo; after the first optimizer step, within what rounding noise put
into PP1's own gradients gives: the noise_floor fixture), also with the MTP layer trained (its loss rides on the
main loss's backward, its embedding copy is summed with the embedding's); a dualpipev run resumed from its own
checkpoint repeats the straight run.

The tiny V4 (assets/tiny_deepseek4) has 4 layers of the three attention kinds, hash-routed and learned-routed MoE
and num_nextn_predict_layers = 1. The comparison machinery is the V3 one (test_pipeline_schedules,
pipeline_workers). transformers has no MTP, so the MTP case starts every layout from one random set of
HF-named weights (our MTP depth 0 beside transformers' model) set into each rank (pipeline_workers._set_hf_weights)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tests.dist_utils import run_distributed
from tests.model.deepseek4_reference import make_hf_v4_model, tiny_v4_config
from tests.training.conftest import hf2mcore
from tests.training.deepseek4_fixtures import SEQ
from tests.training.pipeline_workers import train_steps
from tests.training.test_pipeline_schedules import _assert_same

STEPS = 2

VPP = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
LAYOUTS = {
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "pp2_vpp": VPP,
    "pp2_dualpipev": ["--pipeline-model-parallel-size", "2", "--schedules-method", "dualpipev"],
    "ep2": ["--expert-model-parallel-size", "2"],
}


def _conv_flags(layout: list[str]) -> list[str]:
    return [f.replace("--pipeline-model-parallel-size", "--target-pipeline-parallel-size")
            .replace("--expert-model-parallel-size", "--target-expert-parallel-size") for f in layout]


def _unstack_experts(sd: dict) -> dict:
    """transformers' stacked experts ([E, 2F, D] gate_up_proj, [E, D, F] down_proj) as one tensor per expert."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            for e, t in enumerate(v):
                gate, up = t.chunk(2, 0)
                out[f"{k[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = gate
                out[f"{k[:-len('gate_up_proj')]}{e}.up_proj.weight"] = up
        elif k.endswith("mlp.experts.down_proj"):
            for e, t in enumerate(v):
                out[f"{k[:-len('down_proj')]}{e}.down_proj.weight"] = t
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def v4_hf(tmp_path_factory):
    """The random tiny V4 (transformers) saved as HF with the tiny tokenizer beside it, and a torch file of the
    same weights plus a random MTP depth 0 (HF names, one tensor per expert)."""
    from ckpt_convert.hf_io import copy_side_files
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model, transformer_config
    from mindspeed_dsv.models.deepseek4.names import mcore_to_hf
    from mindspeed_dsv.platform.distributed import init_distributed
    from tests.model.hf_reference import ROOT

    out = tmp_path_factory.mktemp("v4hf")
    cfg_dict = tiny_v4_config(vocab_size=4096)  # the tiny tokenizer's vocabulary
    sd = make_hf_v4_model(cfg_dict, seed=3).state_dict()
    copy_side_files(os.path.join(ROOT, "assets", "tiny_deepseek3"), str(out))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg_dict, f)
    cfg = DeepSeekV4Config.from_hf(cfg_dict)
    init_distributed()  # one rank here: the MoE layers ask megatron for their groups
    torch.manual_seed(4)
    with_mtp = DeepSeekV4Model(cfg, transformer_config(cfg, mtp_num_layers=1), mtp_num_layers=1)
    mtp = {k: v for k, v in mcore_to_hf(with_mtp.state_dict(), cfg, 1).items() if k.startswith("model.mtp.")}
    weights = str(out / "with_mtp.pt")
    torch.save(_unstack_experts({**sd, **mtp}), weights)
    return {"dir": str(out), "with_mtp": weights}


def _args(data, *extra):
    # No gradient clipping: its norm sums squares in a layout-dependent order (~2e-7 apart), and Adam's first step
    # (each entry divided by its own size) turns that into different updates of near-zero gradient entries, which
    # step 2's gradients then show.
    return ["--data-path", data["sft"], "--is-instruction-dataset", "--seq-length", str(SEQ),
            "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(STEPS), "--lr", "1e-3",
            "--clip-grad", "0", "--seed", "5", "--log-interval", "1000", "--no-shuffle", *extra]


def _merge(ranks, steps=STEPS):
    """Per step: the loss every rank reports (must be one value) and the union of the ranks' gradients."""
    merged = []
    for step in range(steps):
        losses = {r[step]["loss"] for r in ranks}
        assert len(losses) == 1, losses
        grads = {}
        for r in ranks:
            grads.update({k: torch.from_numpy(v) for k, v in r[step]["grads"].items()})
        merged.append({"loss": losses.pop(), "grads": grads, "grad_norm": ranks[0][step]["grad_norm"]})
    merged[-1]["eval"] = ranks[0][-1]["eval"]
    return merged


def _run_converted(v4_hf, data, tmp_path, layout, grad_noise=0.0):
    """hf2mcore for `layout` (without MTP), then STEPS steps from that checkpoint."""
    ckpt = hf2mcore(v4_hf["dir"], str(tmp_path / "ckpt"), "--mtp-num-layers", "0", *_conv_flags(layout))
    world = 2 if layout else 1
    return _merge(run_distributed(train_steps, world, _args(data, "--load", ckpt, "--finetune", "--mtp-num-layers",
                                                            "0", *layout), STEPS, None, grad_noise))


def _run_mtp(v4_hf, data, layout):
    """One step, then the forward-only loss on the next batch (which checks the update). A second step's gradients
    differ by 1e-5..5e-5 here (measured): the embedding copy's gradient is summed in another order than PP1's one
    tensor gets it (~1e-7), and Adam's first step amplifies that in near-zero entries (as clipping's norm above)."""
    world = 2 if layout else 1
    args = _args(data, "--model-config", v4_hf["dir"], "--mtp-num-layers", "1", *layout)
    return _merge(run_distributed(train_steps, world, args, 1, v4_hf["with_mtp"]), steps=1)


@pytest.fixture(scope="module")
def reference(v4_hf, v4_inputs, tmp_path_factory):
    return _run_converted(v4_hf, v4_inputs, tmp_path_factory.mktemp("pp1"), [])


@pytest.fixture(scope="module")
def noise_floor(v4_hf, v4_inputs, tmp_path_factory):
    """PP1 again, each gradient entry changed by up to 2^-23 relative before each optimizer step: about the
    rounding EP2's other summation order leaves in step 0's gradients (<= 1.0e-7 relative per tensor, measured).
    Adam's step makes that a change of the weights, and step 1's gradients then move by ~3e-6 relative, up to
    1e-5..4e-5 in the smallest tensors (hyper-connection scales: 3 numbers, |g| 1.3e-3 of a 21.5 total, a sum
    that cancels); EP2's differ as much (layers.2.attn_hc.scale: 1.4e-5 on one CPU, below 1e-5 on another)."""
    return _run_converted(v4_hf, v4_inputs, tmp_path_factory.mktemp("floor"), [], grad_noise=2.0**-23)


# PP2 + VPP is the one layout where the two ranks exchange activations and gradients of one shape in both
# directions at once: it caught gloo's swap of megatron's batched p2p for V4 too (models.config.pipeline_p2p).
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_rank(reference, noise_floor, v4_hf, v4_inputs, tmp_path, name):
    got = _run_converted(v4_hf, v4_inputs, tmp_path, LAYOUTS[name])
    assert len(reference[0]["grads"]) > 50  # every trained tensor is compared (the indexers are frozen)
    _assert_same(reference, got, floor=noise_floor)


@pytest.fixture(scope="module")
def mtp_reference(v4_hf, v4_inputs):
    return _run_mtp(v4_hf, v4_inputs, [])


@pytest.mark.parametrize("name", ["pp2", "pp2_dualpipev", "ep2"])
def test_mtp_layout_matches_one_rank(mtp_reference, v4_hf, v4_inputs, name):
    """With MTP: on PP2 1F1B the MTP layer and its embedding copy sit on rank 1, on dualpipev in chunk 1 of
    rank 0 beside the embedding itself; EP2 splits its experts."""
    assert any(k.startswith("model.mtp.0.") for k in mtp_reference[0]["grads"])
    _assert_same(mtp_reference, _run_mtp(v4_hf, v4_inputs, LAYOUTS[name]))


def test_dualpipev_resumes_exactly(v4_hf, v4_inputs, tmp_path):
    """A dualpipev run saved after step 1 and resumed gives the straight run's losses and gradient norms."""
    from tests.training.test_train import _train

    layout = LAYOUTS["pp2_dualpipev"]
    ckpt = hf2mcore(v4_hf["dir"], str(tmp_path / "in"), "--mtp-num-layers", "0", *_conv_flags(layout))
    common = _args(v4_inputs, "--mtp-num-layers", "0", *layout)
    save = str(tmp_path / "out")
    straight = run_distributed(_train, 2, [*common, "--load", ckpt, "--finetune", "--save", save,
                                           "--save-interval", "1"])[0]
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")  # resume from step 1's checkpoint (the run also saved step 2)
    second = run_distributed(_train, 2, [*common, "--load", save])[0]
    assert [h["iteration"] for h in second] == [2]
    assert straight[1]["lm loss"] == second[0]["lm loss"] and straight[1]["grad norm"] == second[0]["grad norm"]
