"""--moe-fb-overlap changes nothing numerically and interleaves forward and backward at the expert all-to-alls.

EP2 x PP2 dualpipev (4 ranks, fp32, cpu/gloo; data parallel 2, so 4 micro-batches per rank = the minimum 2 * PP)
against one rank on the same converted weights, data and seed: the loss of every step and every parameter's
gradient before clipping agree to 1e-5 relative; the same run without the flag gives bit-identical numbers. The
tiny model has 4 layers (1 dense, 3 MoE) and an MoE MTP layer: rank 0 holds the dense layer and, in its second
chunk, the last MoE layer and MTP; rank 1 two MoE layers."""

import numpy as np
import pytest
import torch

from mindspeed_dsv.pipeline_order import dualpipev_slots
from tests.ckpt.helpers import make_hf_dir
from tests.dist_utils import run_distributed
from tests.training.conftest import hf2mcore
from tests.training.pipeline_workers import train_steps
from tests.training.test_pipeline_schedules import STEPS, _assert_same

GBS = "8"


@pytest.fixture(scope="module")
def hf4(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("hf4")), mtp=True, seed=3)


def _run(ckpt, data, world, train_flags=()):
    argv = ["--data-path", data["sft"], "--is-instruction-dataset", "--seq-length", "128", "--micro-batch-size", "1",
            "--global-batch-size", GBS, "--train-iters", str(STEPS), "--lr", "1e-4", "--seed", "5",
            "--log-interval", "1000", "--finetune", "--no-shuffle", "--load", ckpt, *train_flags]
    return run_distributed(train_steps, world, argv, STEPS)


def _merged(ranks):
    out = []
    for step in range(STEPS):
        losses = {r[step]["loss"] for r in ranks}
        assert len(losses) == 1, losses
        grads = {}
        for r in ranks:
            grads.update({k: torch.from_numpy(v) for k, v in r[step]["grads"].items()})
        out.append({"loss": losses.pop(), "grads": grads})
    return out


def _check_interleaved(handovers, pp_rank):
    """Each overlapped pair starts with the forward, and the sides alternate F, B, F, B... at the all-to-alls
    until one of them has none left; as many pairs as dualpipev_slots pairs for this rank."""
    pairs, current = [], None
    for side, name in handovers:
        if (side, name) == ("pair", "start"):
            current = []
        elif (side, name) == ("pair", "end"):
            pairs.append(current)
            current = None
        else:
            assert current is not None, "an all-to-all handed over outside a pair"
            assert name in ("dispatch", "combine"), name
            current.append(side)
    expected = sum(len(s) == 2 for s in dualpipev_slots(2, pp_rank, 4, overlap=True))
    assert len(pairs) == expected > 0, (len(pairs), expected)
    both = 0
    for sides in pairs:
        n = min(sides.count("F"), sides.count("B"))
        if n:  # the forward runs first, then they alternate while both have all-to-alls left
            assert sides[: 2 * n] == ["F", "B"] * n, sides
        assert len(set(sides[2 * n:])) <= 1, sides  # then the side with points left runs alone
        both += n > 0
    return both


def test_fb_overlap_matches_one_rank_and_plain_dualpipev(hf4, tiny_data, tmp_path):
    conv = ["--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2", "--schedules-method",
            "dualpipev"]
    layout = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--schedules-method",
              "dualpipev"]
    ckpt = hf2mcore(hf4, str(tmp_path / "ckpt"), *conv)  # one conversion for both runs (training only loads it)
    on = _run(ckpt, tiny_data, 4, [*layout, "--moe-fb-overlap"])
    off = _run(ckpt, tiny_data, 4, layout)
    for rank, (a, b) in enumerate(zip(on, off)):
        for step in range(STEPS):
            assert a[step]["loss"] == b[step]["loss"], (rank, step)
            assert sorted(a[step]["grads"]) == sorted(b[step]["grads"])
            for name, g in a[step]["grads"].items():
                assert np.array_equal(g, b[step]["grads"][name]), (rank, step, name)
            assert b[step]["handovers"] == []  # without the flag nothing is paired

    reference = _merged(_run(hf2mcore(hf4, str(tmp_path / "pp1")), tiny_data, 1))
    merged = _merged(on)
    # the measured agreement, for the docs (pytest -s shows it)
    loss_rel = max(abs(b["loss"] - a["loss"]) / abs(a["loss"]) for a, b in zip(reference, merged))
    grad_rel = max(((a["grads"][k] - b["grads"][k]).norm() / a["grads"][k].norm().clamp(min=1e-30)).item()
                   for a, b in zip(reference, merged) for k in a["grads"])
    print(f"--moe-fb-overlap EP2xPP2 vs PP1: loss rel {loss_rel:.1e}, grad rel {grad_rel:.1e}")
    _assert_same(reference, merged)

    # ranks are (pp, dp) with pp outermost in megatron's default order: 0, 1 -> pp 0; 2, 3 -> pp 1
    interleaved = [_check_interleaved(r[0]["handovers"], rank // 2) for rank, r in enumerate(on)]
    # pairs where both sides reach all-to-alls: on PP rank 1 (MoE layers in both chunks) 3 of its pairs; on PP rank 0
    # none, since one side of each pair is chunk 0, the dense layer (its pairs still run, without hand-overs)
    assert interleaved == [0, 0, 3, 3], interleaved
