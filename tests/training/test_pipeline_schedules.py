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
FLOOR_FACTOR = 4  # V4's EP2 needed at most 0.43x its floor (10 noise draws at 2^-23 and 2^-22): ~10x margin


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
    merged[-1]["eval"] = ranks[0][-1]["eval"]
    return merged


def _assert_same(ref, got, floor=None):
    """Same loss (and eval loss) and, per tensor, ||g_got - g_ref|| < RTOL * ||g_ref||. `floor`: the reference run
    again with rounding-sized noise put into its gradients before each optimizer step (pipeline_workers
    grad_noise); a tensor may then differ by FLOOR_FACTOR times what the floor run differs by, on top: after an
    Adam step a layout's rounding differences are differences of the weights, and a tensor whose gradient
    cancels to a small sum shows them large relative to its own norm. Step 0 comes before any noise, so there
    the floor adds nothing."""
    for step, (a, b) in enumerate(zip(ref, got)):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), (step, a["loss"], b["loss"])
        if "eval" in a:
            assert b["eval"] == pytest.approx(a["eval"], rel=RTOL), ("eval", a["eval"], b["eval"])
        assert sorted(a["grads"]) == sorted(b["grads"])
        for name, ga in a["grads"].items():
            gb = b["grads"][name]
            size = ga.norm().clamp(min=1e-30)
            rel = ((ga - gb).norm() / size).item()
            noise = 0.0 if floor is None else ((ga - floor[step]["grads"][name]).norm() / size).item()
            assert rel < RTOL + FLOOR_FACTOR * noise, \
                f"step {step} {name}: relative difference {rel:.2e} (noise floor {noise:.2e})"


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


def test_dualpipev_resumes_exactly_and_converts_back(hf5, tiny_data, tmp_path):
    """A dualpipev run saved after step 1 and resumed gives the straight run's losses; its final checkpoint
    converts back to HF (mcore2hf) and equals, tensor by tensor, the PP1 run's converted back the same way."""
    from ckpt_convert.cli import main as convert
    from ckpt_convert.hf_io import read_all
    from tests.training.test_train import _train

    flags = ["--num-layers", "8", "--noop-layers", "5,6,7", "--schedules-method", "dualpipev"]
    dpv = hf2mcore(hf5, str(tmp_path / "dpv_in"), "--target-pipeline-parallel-size", "2", *flags)
    one = hf2mcore(hf5, str(tmp_path / "pp1_in"))

    def args(load, save, *extra, finetune=True):
        out = _args(tiny_data, load, *extra) + ["--save", save]
        return out if finetune else [a for a in out if a != "--finetune"]

    pp2 = ["--pipeline-model-parallel-size", "2", *flags]
    straight = run_distributed(_train, 2, args(dpv, str(tmp_path / "dpv_out"), *pp2))[0]
    half = str(tmp_path / "half")
    first = run_distributed(_train, 2, args(dpv, half, "--exit-interval", "1", *pp2))[0]
    second = run_distributed(_train, 2, args(half, str(tmp_path / "rest"), *pp2, finetune=False))[0]
    assert [h["iteration"] for h in first + second] == [1, 2]
    for a, b in zip(straight, first + second):
        assert a["lm loss"] == b["lm loss"] and a["grad norm"] == b["grad norm"], (a, b)

    (ref,) = run_distributed(_train, 1, args(one, str(tmp_path / "pp1_out")))
    for a, b in zip(ref, straight):
        assert b["lm loss"] == pytest.approx(a["lm loss"], rel=RTOL)
    for name in ("dpv_out", "pp1_out"):
        assert convert(["mcore2hf", "--load-dir", str(tmp_path / name), "--save-dir", str(tmp_path / f"{name}_hf"),
                        "--no-progress"]) == 0
    got, want = read_all(str(tmp_path / "dpv_out_hf")), read_all(str(tmp_path / "pp1_out_hf"))
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
