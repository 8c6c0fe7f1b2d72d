"""Noop layers and pipeline schedules change nothing numerically: the same converted weights, data and seed give
the same loss and the same gradient for every real parameter (fp32, cpu/gloo) as one rank without padding.

The HF model has 5 layers and MTP, so 61 + 3 noop of DeepSeek-V3's templates is mimicked by 5 + 3 noop = 8."""

import pytest
import torch

from tests.ckpt.helpers import make_hf_dir
from tests.dist_utils import run_distributed
from tests.training.conftest import hf2mcore
from tests.training.pipeline_workers import train_steps

STEPS = 2
RTOL = 1e-5


@pytest.fixture(scope="module")
def hf5(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("hf5")), mtp=True, seed=3,
                       config_overrides={"num_hidden_layers": 5})


def _args(data, ckpt, *layout):
    return ["--data-path", data["sft"], "--is-instruction-dataset", "--seq-length", "128", "--micro-batch-size", "1",
            "--global-batch-size", "4", "--train-iters", str(STEPS), "--lr", "1e-3", "--seed", "5", "--log-interval", "1000", "--finetune",
            "--no-shuffle", "--load", ckpt, *layout]


def _run(hf_dir, data, tmp_path, name, world, conv_flags=(), train_flags=()):
    ckpt = hf2mcore(hf_dir, str(tmp_path / name), "--target-pipeline-parallel-size", str(world), *conv_flags)
    ranks = run_distributed(train_steps, world, _args(data, ckpt, "--pipeline-model-parallel-size", str(world),
                                                      *conv_flags, *train_flags), STEPS)
    merged = []
    for step in range(STEPS):
        losses = {r[step]["loss"] for r in ranks}
        assert len(losses) == 1, losses  # every rank reports the reduced loss
        grads = {}
        for r in ranks:
            grads.update({k: torch.from_numpy(v) for k, v in r[step]["grads"].items()})
        merged.append({"loss": losses.pop(), "grads": grads})
    return merged


def _assert_same(ref, got):
    for step, (a, b) in enumerate(zip(ref, got)):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), (step, a["loss"], b["loss"])
        assert sorted(a["grads"]) == sorted(b["grads"])
        for name, ga in a["grads"].items():
            gb = b["grads"][name]
            rel = ((ga - gb).norm() / ga.norm().clamp(min=1e-30)).item()
            assert rel < RTOL, f"step {step} {name}: relative difference {rel:.2e}"


@pytest.fixture(scope="module")
def reference(hf5, tiny_data, tmp_path_factory):
    return _run(hf5, tiny_data, tmp_path_factory.mktemp("ref"), "pp1", 1)


@pytest.mark.parametrize(
    "world,flags",
    [
        (1, ["--num-layers", "8", "--noop-layers", "5,6,7"]),
        (2, ["--num-layers", "6", "--noop-layers", "2"]),
        (2, ["--num-layers", "8", "--noop-layers", "1,6,7", "--num-layers-per-virtual-pipeline-stage", "2"]),
    ],
    ids=["pp1_noop", "pp2_noop", "pp2_vpp_noop"],
)
def test_noop_layers_match_unpadded(reference, hf5, tiny_data, tmp_path, world, flags):
    _assert_same(reference, _run(hf5, tiny_data, tmp_path, "run", world, flags))


def test_dualpipev_matches_one_rank(reference, hf5, tiny_data, tmp_path):
    """PP2 dualpipev, 8 layers = 5 + noop 5,6,7 as 4 virtual stages [0,1 | 2,3 | 4,5n | 6n,7n]: rank 0 holds the
    embedding, the first and the last (all-noop) stage, the output layer, the loss and MTP (with its own copy of
    the embedding, whose gradient is summed with the embedding's). 4 micro-batches = the minimum 2 * PP."""
    flags = ["--num-layers", "8", "--noop-layers", "5,6,7", "--schedules-method", "dualpipev"]
    _assert_same(reference, _run(hf5, tiny_data, tmp_path, "dualpipev", 2, flags))
