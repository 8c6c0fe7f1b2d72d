"""The trainer builds and trains the tiny DeepSeek-V4 on cpu/gloo: SFT and pretraining losses fall, a resumed run
continues the straight run's curve, and what V4 does not act on is refused by name before any weight exists."""

import re

import pytest

from tests.dist_utils import run_distributed
from tests.training.deepseek4_fixtures import make_v4_inputs, v4_args
from tests.training.test_train import _train


@pytest.fixture(scope="module")
def v4_inputs(tmp_path_factory):
    return make_v4_inputs(str(tmp_path_factory.mktemp("v4")))


def test_sft_loss_falls(v4_inputs):
    args = v4_args(v4_inputs, "sft", "--train-iters", "12", "--global-batch-size", "4", "--lr-warmup-iters", "2")
    (history,) = run_distributed(_train, 1, args)
    first, last = history[0]["lm loss"], sum(h["lm loss"] for h in history[-3:]) / 3
    assert 7.5 < first < 9.0  # ~ln(4096) at random init
    assert last < 0.93 * first, (first, last)  # 8.38 -> 7.58 measured (12 steps, lr 3e-3)


def test_pretrain_resume_continues_the_same_curve(v4_inputs, tmp_path):
    common = v4_args(v4_inputs, "pretrain", "--train-iters", "4", "--global-batch-size", "4",
                     "--lr-warmup-iters", "1")
    (straight,) = run_distributed(_train, 1, common)
    assert straight[-1]["lm loss"] < straight[0]["lm loss"]
    save = str(tmp_path / "ckpt")
    (first_half,) = run_distributed(_train, 1, [*common, "--save", save, "--exit-interval", "2"])
    (second_half,) = run_distributed(_train, 1, [*common, "--load", save])
    assert [h["iteration"] for h in second_half] == [3, 4]
    for a, b in zip(straight, first_half + second_half):
        assert a["lm loss"] == b["lm loss"], (a, b)  # bit-identical: same weights, optimizer, rng, data position
        assert a["grad norm"] == b["grad norm"], (a, b)


@pytest.mark.parametrize("flags, message", [
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], "DeepSeek-V4 trains with --tensor-model-parallel-size 1"),
    (["--mtp-num-layers", "1"], "DeepSeek-V4 MTP is not trained yet"),
    (["--recompute-granularity", "full"], "no activation recompute"),
    (["--moe-aux-loss-coeff", "0.01"], "without an auxiliary balance loss"),
    (["--use-flash-attn"], "--use-flash-attn does not act on DeepSeek-V4"),
])
def test_refused_flags(v4_inputs, flags, message):
    import json

    from mindspeed_dsv.training.arguments import ArgumentError, build_parser, validate

    argv = [a for a in v4_args(v4_inputs, "sft", "--train-iters", "2") if a not in ("--mtp-num-layers", "0")]
    if "--mtp-num-layers" not in flags:
        argv += ["--mtp-num-layers", "0"]
    args = build_parser().parse_args([*argv, *flags])
    with open(f"{v4_inputs['model']}/config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    with pytest.raises(ArgumentError, match=re.escape(message)):
        validate(args, 2, cfg)
