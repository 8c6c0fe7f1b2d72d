"""Nothing trains silently wrong: flags against the checkpoint's layout record and the dataset summary (the run
and its dry run alike), non-finite loss stops the run, tokens/s counts real tokens only."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.ckpt.helpers import edit_rank_file, make_hf_dir
from tests.dist_utils import run_distributed
from tests.training.conftest import ROOT, hf2mcore

EXAMPLES = os.path.join(ROOT, "examples", "mcore", "deepseek3")


@pytest.fixture(scope="module")
def no_mtp_ckpt(tmp_path_factory):
    """config.json says one MTP layer, the weights hold none: hf2mcore converts without MTP (layout.json
    records mtp_num_layers 0) and copies the config as it is."""
    root = tmp_path_factory.mktemp("nomtp")
    hf = make_hf_dir(str(root / "hf"), mtp=False, seed=3)
    ckpt = hf2mcore(hf, str(root / "mcore"))
    with open(os.path.join(ckpt, "config.json")) as f:
        assert json.load(f)["num_nextn_predict_layers"] == 1
    with open(os.path.join(ckpt, "layout.json")) as f:
        assert json.load(f)["layout"]["mtp_num_layers"] == 0
    return ckpt


def _args(*argv):
    from mindspeed_dsv.training.arguments import build_parser

    return build_parser().parse_args(["--train-iters", "2", *argv])


def _resolve(args):
    from mindspeed_dsv.training.arguments import resolve_model_config_path
    from mindspeed_dsv.training.records import resolve

    with open(resolve_model_config_path(args)) as f:
        return resolve(args, 1, json.load(f))


def _sft(data, seq="128"):
    return ["--data-path", data["sft"], "--is-instruction-dataset", "--seq-length", seq, "--micro-batch-size", "2",
            "--global-batch-size", "2", "--seed", "5", "--log-interval", "1000"]


# ----------------------------------------------------------------------------------------- item 20
def test_layout_flags_not_given_come_from_the_checkpoint(no_mtp_ckpt, tiny_data):
    layout, notes = _resolve(_args("--load", no_mtp_ckpt, "--finetune", *_sft(tiny_data)))
    assert layout.mtp_num_layers == 0
    assert notes == [f"--mtp-num-layers 0 (from {no_mtp_ckpt}/layout.json)"]


def test_layout_flag_given_against_the_checkpoint_is_named(no_mtp_ckpt, tiny_data):
    from mindspeed_dsv.layout import LayoutError

    with pytest.raises(LayoutError, match=r"--mtp-num-layers \(mtp_num_layers\): 0 != 1"):
        _resolve(_args("--load", no_mtp_ckpt, "--finetune", "--mtp-num-layers", "1", *_sft(tiny_data)))


def _train_history(argv):
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.loop import train

    state = train(build_parser().parse_args(argv))
    return [{k: r[k] for k in ("iteration", "lm loss", "tokens", "tokens_per_s", "step_time")} for r in state.history]


def test_training_runs_on_a_checkpoint_converted_without_mtp(no_mtp_ckpt, tiny_data):
    (history,) = run_distributed(_train_history, 1, ["--train-iters", "1", "--load", no_mtp_ckpt, "--finetune",
                                                     *_sft(tiny_data)])
    assert history[0]["lm loss"] > 5


# ----------------------------------------------------------------------------------------- item 6
def test_seq_length_must_equal_the_packing_length(tiny_data):
    from mindspeed_dsv.training.arguments import ArgumentError

    with pytest.raises(ArgumentError) as e:
        _resolve(_args("--model-config", "assets/tiny_deepseek3", *_sft(tiny_data, seq="256")))
    assert str(e.value) == (f"--seq-length 256 differs from the seq_length 128 the data was packed to "
                            f"({tiny_data['sft']}_summary.json); train with --seq-length 128, or preprocess again "
                            f"with --seq-length 256")


@pytest.fixture(scope="module")
def unpacked_sft(tmp_path_factory):
    """Alpaca data one sample per row (no packing): rows are shorter than --seq-length and padded when read."""
    from mindspeed_dsv.data.preprocess import main

    prefix = str(tmp_path_factory.mktemp("unpacked") / "sft")
    assert main(["--input", "assets/data/alpaca_builtins.jsonl", "--output-prefix", prefix,
                 "--tokenizer-name-or-path", "assets/tiny_deepseek3", "--handler-name",
                 "AlpacaStyleInstructionHandler", "--seq-length", "128", "--no-progress"]) == 0
    return prefix


def test_tokens_per_second_counts_real_tokens_only(unpacked_sft):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    argv = ["--model-config", "assets/tiny_deepseek3", "--train-iters", "2", "--data-path", unpacked_sft,
            "--is-instruction-dataset", "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--no-shuffle", "--log-interval", "1000"]
    (history,) = run_distributed(_train_history, 1, argv)
    ds = IndexedDataset(unpacked_sft + "_packed_input_ids_document")
    lengths = ds.sequence_lengths.copy()  # a view into ds's mmap: copied while ds is alive
    # --no-shuffle: step k takes rows 4k..4k+3; their stored lengths are the real tokens
    expected = [int(lengths[0:4].sum()), int(lengths[4:8].sum())]
    assert [h["tokens"] for h in history] == expected
    assert all(t < 4 * 128 for t in expected)  # the rows are padded, and the padding is not counted
    for h in history:
        assert h["tokens_per_s"] == pytest.approx(h["tokens"] / h["step_time"], rel=1e-9)


# ----------------------------------------------------------------------------------------- item 5
def _main(argv):
    import contextlib
    import io

    from mindspeed_dsv.training.loop import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def nan_ckpt(tiny_hf_dir, tmp_path_factory):
    """A converted checkpoint whose final norm holds one NaN (what flipped bytes can give)."""
    ckpt = hf2mcore(tiny_hf_dir, str(tmp_path_factory.mktemp("nan") / "mcore"))
    # Re-recorded checksum: the NaN is in the values the run loads (as diverged training would write), not a
    # corrupt file, which checksum verification stops before any step (tests/ckpt/test_writes.py).
    path = os.path.join(ckpt, "iter_0000001", "mp_rank_00", "model_optim_rng.pt")
    edit_rank_file(path, lambda state: state["model"]["decoder.final_layernorm.weight"].__setitem__(0, float("nan")))
    return ckpt


def test_non_finite_loss_stops_naming_the_iteration(nan_ckpt, tiny_data, tmp_path):
    save = tmp_path / "save"
    ((rc, err),) = run_distributed(_main, 1, ["--train-iters", "3", "--load", nan_ckpt, "--finetune",
                                              "--save", str(save), *_sft(tiny_data)])
    assert rc == 1
    assert "error: iteration 1: lm loss nan" in err
    assert "--no-check-for-nan-in-loss-and-grad" in err
    assert not save.exists() or not os.listdir(save)  # nothing saved from a NaN run


def test_nan_check_can_be_turned_off(nan_ckpt, tiny_data):
    ((rc, err),) = run_distributed(_main, 1, ["--train-iters", "2", "--load", nan_ckpt, "--finetune",
                                              "--no-check-for-nan-in-loss-and-grad", *_sft(tiny_data)])
    assert rc == 0, err


# ----------------------------------------------------------------------------------------- item 8
def _dry_run(*extra, env):
    return subprocess.run(["bash", os.path.join(EXAMPLES, "tune_deepseek3_tiny_full_cpu.sh"), "--dry-run", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore", **env})


def test_dry_run_applies_the_runs_record_checks(no_mtp_ckpt, tiny_data, tmp_path):
    env = {"CKPT_LOAD_DIR": no_mtp_ckpt, "DATA_PATH": tiny_data["sft"], "TOKENIZER_PATH": no_mtp_ckpt,
           "CKPT_SAVE_DIR": str(tmp_path / "save")}
    # the template trains at --seq-length 256; the data was packed to 128
    r = _dry_run(env=env)
    assert r.returncode == 2, r.stdout[-2000:]
    assert "--seq-length 256 differs from the seq_length 128" in r.stderr
    # a layout flag against the checkpoint's record
    r = _dry_run("--seq-length", "128", "--mtp-num-layers", "1", env=env)
    assert r.returncode == 2, r.stdout[-2000:]
    assert "--mtp-num-layers (mtp_num_layers): 0 != 1" in r.stderr
    # consistent flags pass, the MTP count taken from the checkpoint
    r = _dry_run("--seq-length", "128", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"--mtp-num-layers 0 (from {no_mtp_ckpt}/layout.json)" in r.stdout
