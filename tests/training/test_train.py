"""The trainer on cpu/gloo: it learns, resumes the same loss curve, and parallel layouts agree."""

import os

import pytest

from tests.dist_utils import run_distributed
from tests.training.conftest import hf2mcore


def _train(argv):
    """Runs the trainer in this (spawned) rank; returns the logged per-step metrics."""
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.loop import train

    state = train(build_parser().parse_args(argv))
    return [{k: r[k] for k in ("iteration", "lm loss", "grad norm", "lr")} for r in state.history]


def _sft_args(data, *extra):
    return ["--data-path", data["sft"], "--is-instruction-dataset", "--seq-length", "128", "--micro-batch-size", "2",
            "--lr", "2e-3", "--min-lr", "2e-4", "--seed", "5", "--log-interval", "1000", *extra]


def test_sft_loss_falls(tiny_data, tmp_path):
    tb = tmp_path / "tb"
    args = _sft_args(tiny_data, "--model-config", "assets/tiny_deepseek3", "--train-iters", "40",
                     "--global-batch-size", "4", "--lr-warmup-iters", "2", "--tensorboard-dir", str(tb))
    (history,) = run_distributed(_train, 1, args)
    first, last = history[0]["lm loss"], sum(h["lm loss"] for h in history[-5:]) / 5
    assert first > 7.5  # ~ln(4096) at random init
    assert last < 0.6 * first, (first, last)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    logged = [e.value for e in events.Scalars("lm_loss")]
    assert len(logged) == 40 and logged[0] == pytest.approx(first, rel=1e-6)


def test_resume_continues_the_same_curve(tiny_data, tmp_path):
    common = _sft_args(tiny_data, "--model-config", "assets/tiny_deepseek3", "--train-iters", "6",
                       "--global-batch-size", "4", "--lr-warmup-iters", "1")
    (straight,) = run_distributed(_train, 1, common)
    save = str(tmp_path / "ckpt")
    (first_half,) = run_distributed(_train, 1, [*common, "--save", save, "--exit-interval", "3"])
    (second_half,) = run_distributed(_train, 1, [*common, "--load", save])
    assert [h["iteration"] for h in second_half] == [4, 5, 6]
    resumed = first_half + second_half
    for a, b in zip(straight, resumed):
        assert a["lm loss"] == pytest.approx(b["lm loss"], rel=1e-6, abs=1e-6), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)


def _common_layout_args(tiny_data):
    return _sft_args(tiny_data, "--train-iters", "3", "--global-batch-size", "4", "--finetune", "--no-shuffle")


@pytest.fixture(scope="module")
def single_rank_curve(tiny_data, tiny_hf_dir, tmp_path_factory):
    """The 1-rank run every 2-rank layout is compared with (the same for all of them)."""
    one = hf2mcore(tiny_hf_dir, str(tmp_path_factory.mktemp("tp1") / "ckpt"))
    (ref,) = run_distributed(_train, 1, [*_common_layout_args(tiny_data), "--load", one])
    return ref


@pytest.mark.parametrize(
    "layout",
    [
        ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        ["--expert-model-parallel-size", "2"],
        ["--pipeline-model-parallel-size", "2"],
        # vocabulary padded to 4098 rows (multiple of 3 * TP): rank 1's two padded ids are masked out of the loss
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--make-vocab-size-divisible-by", "3"],
        # expert-TP 1 at TP2: experts whole on both ranks (expert-data-parallel replicas, grads summed over both)
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1"],
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1",
         "--expert-model-parallel-size", "2", "--moe-grouped-gemm"],
        # --moe-tp-extend-ep runs as megatron's expert-TP 1 with EP over TP*EP = 2 ranks
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--moe-tp-extend-ep"],
    ],
    ids=["tp2", "ep2", "pp2", "tp2_padded_vocab", "tp2_etp1", "tp2_etp1_ep2_grouped", "tp2_extend_ep"],
)
def test_parallel_layouts_match_single_rank(tiny_data, tiny_hf_dir, tmp_path, layout, single_rank_curve):
    """Same converted weights, same data and seed: 2-rank layouts follow the 1-rank loss curve."""
    conv_flags = [f.replace("--tensor-model", "--target-tensor").replace("--expert-model", "--target-expert")
                  .replace("--pipeline-model", "--target-pipeline").replace("--expert-tensor", "--target-expert-tensor")
                  for f in layout if f != "--sequence-parallel"]
    conv_flags = [f.replace("-model-parallel-size", "-parallel-size") for f in conv_flags]
    two = hf2mcore(tiny_hf_dir, str(tmp_path / "two"), *conv_flags)
    common = _common_layout_args(tiny_data)
    ref = single_rank_curve
    save = str(tmp_path / "saved")
    results = run_distributed(_train, 2, [*common, "--load", two, *layout, "--save", save])
    got = results[0]
    for a, b in zip(ref, got):
        assert a["lm loss"] == pytest.approx(b["lm loss"], rel=2e-5), (ref, got)
        assert a["grad norm"] == pytest.approx(b["grad norm"], rel=2e-4), (ref, got)
    # the trainer saved the files the converter writes for this layout, and they read back as HF tensors
    assert sorted(os.listdir(os.path.join(save, "iter_0000003"))) == sorted(
        os.listdir(os.path.join(two, "iter_0000001")))
    from ckpt_convert.cli import main

    assert main(["mcore2hf", "--load-dir", save, "--save-dir", str(tmp_path / "hf"), "--no-progress"]) == 0
