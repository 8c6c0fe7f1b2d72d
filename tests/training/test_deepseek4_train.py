"""The trainer builds and trains the tiny DeepSeek-V4 (with its MTP layer) on cpu/gloo: the SFT loss falls, the
MTP loss is logged every step, a run resumed from a mid-run checkpoint continues the straight run bit for bit,
pretraining on a document corpus falls too, and what V4 does not act on is refused by name before any weight
exists. Pipeline layouts: test_deepseek4_pipeline.py."""

import os
import re

import pytest

from tests.dist_utils import run_distributed
from tests.training.deepseek4_fixtures import v4_args


def _train(argv):
    """The trainer in this (spawned) rank; per step the logged metrics, the MTP loss included."""
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.loop import train

    state = train(build_parser().parse_args(argv))
    return [{k: r.get(k) for k in ("iteration", "lm loss", "mtp loss", "grad norm")} for r in state.history]


def test_sft_with_mtp_falls_and_resumes_exactly(v4_inputs, tmp_path):
    save = str(tmp_path / "ckpt")
    args = v4_args(v4_inputs, "--train-iters", "6", "--global-batch-size", "4", "--lr-warmup-iters", "1")
    (straight,) = run_distributed(_train, 1, [*args, "--save", save, "--save-interval", "3"])
    first, last = straight[0], straight[-1]
    assert 7.5 < first["lm loss"] < 9.0  # ~ln(4096) at random init
    assert last["lm loss"] < 0.97 * first["lm loss"], (first, last)
    # MTP depth 0 predicts one token further with the same head: about as hard at random init
    assert all(h["mtp loss"] is not None for h in straight)
    assert 7.5 < first["mtp loss"] < 9.0 and last["mtp loss"] < first["mtp loss"], (first, last)

    # resume from the checkpoint of step 3 (the run also saved its end, step 6)
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("3")
    (resumed,) = run_distributed(_train, 1, [*args, "--load", save])
    assert [h["iteration"] for h in resumed] == [4, 5, 6]
    for a, b in zip(straight[3:], resumed):
        assert a == b  # bit-identical: same weights, optimizer, rng, data position


def test_pretrain_loss_falls(v4_inputs, tiny_data):
    """Pretraining (document corpus, --append-eod; the tiny V3 tokenizer the V4 tiny config shares), whole-layer
    recompute on: the LM and MTP losses fall."""
    args = ["--data-path", tiny_data["pretrain"], "--model-config", v4_inputs["model"], "--seq-length", "64",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--seed", "5", "--log-interval", "1000", "--recompute-granularity", "full",
            "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    (history,) = run_distributed(_train, 1, args)
    first, last = history[0], history[-1]
    assert 7.5 < first["lm loss"] < 9.0 and last["lm loss"] < 0.98 * first["lm loss"], (first, last)  # measured 8.34 -> 8.09
    assert last["mtp loss"] < first["mtp loss"], (first, last)


@pytest.mark.parametrize("flags, message", [
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], "DeepSeek-V4 trains with --tensor-model-parallel-size 1"),
    (["--recompute-activation-function"], "recomputes whole layers only"),
    (["--moe-aux-loss-coeff", "0.01"], "without an auxiliary balance loss"),
    (["--use-flash-attn"], "--use-flash-attn does not act on DeepSeek-V4"),
])
def test_refused_flags(v4_inputs, flags, message):
    import json

    from mindspeed_dsv.training.arguments import ArgumentError, build_parser, validate

    args = build_parser().parse_args([*v4_args(v4_inputs, "--train-iters", "2"), *flags])
    with open(f"{v4_inputs['model']}/config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    with pytest.raises(ArgumentError, match=re.escape(message)):
        validate(args, 2, cfg)
