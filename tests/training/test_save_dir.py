"""Training never saves over another run's checkpoints (issue 18.3): a --save directory that holds checkpoints
this run does not continue is refused before training unless --overwrite; resuming --load DIR --save DIR works."""

import json
import os

import pytest

from ckpt_convert.mcore_io import TRACKER, read_iteration, verify_iteration
from mindspeed_dsv.training.checkpointing import CheckpointError, check_save_dir
from tests.dist_utils import run_distributed
from tests.training.test_train import _sft_args, _train


def _fake_run(d, latest=14):
    os.makedirs(os.path.join(d, f"iter_{latest:07d}"))
    with open(os.path.join(d, TRACKER), "w") as f:
        f.write(str(latest))
    return d


def test_check_save_dir_rules(tmp_path):
    other = _fake_run(str(tmp_path / "other"))
    with pytest.raises(CheckpointError, match=r"--save .*other already holds checkpoints \(1 iteration\(s\), latest 14\)"):
        check_save_dir(other, None, None, finetune=False, overwrite=False)
    with pytest.raises(CheckpointError, match="--overwrite"):
        check_save_dir(other, str(tmp_path / "base"), None, finetune=False, overwrite=False)
    with pytest.raises(CheckpointError, match="--finetune"):  # restarts at step 0 over the loaded run
        check_save_dir(other, other, None, finetune=True, overwrite=False)
    check_save_dir(other, other, None, finetune=False, overwrite=False)  # resume
    check_save_dir(other, str(tmp_path / "base"), other, finetune=False, overwrite=False)  # resume LoRA
    check_save_dir(other, None, None, finetune=False, overwrite=True)
    check_save_dir(str(tmp_path / "new"), None, None, finetune=False, overwrite=False)
    os.makedirs(tmp_path / "logs")
    open(tmp_path / "logs" / "x.log", "w").close()
    check_save_dir(str(tmp_path / "logs"), None, None, finetune=False, overwrite=False)  # no checkpoint there


def test_trainer_refuses_before_training_and_resume_in_place_works(tiny_data, tmp_path, capsys):
    from mindspeed_dsv.training.loop import main

    common = _sft_args(tiny_data, "--model-config", "assets/tiny_deepseek3", "--train-iters", "4",
                       "--global-batch-size", "2", "--lr-warmup-iters", "1")
    other = _fake_run(str(tmp_path / "other"))
    before = sorted(os.listdir(other))
    assert main([*common, "--save", other]) == 1
    err = capsys.readouterr().err
    assert f"--save {other} already holds checkpoints" in err and "--overwrite" in err, err
    assert sorted(os.listdir(other)) == before and read_iteration(other) == "14"

    save = str(tmp_path / "run")
    run_distributed(_train, 1, [*common, "--save", save, "--exit-interval", "2"])
    (second,) = run_distributed(_train, 1, [*common, "--load", save, "--save", save])
    assert [h["iteration"] for h in second] == [3, 4]
    assert read_iteration(save) == "4"
    assert verify_iteration(save) == 1  # the rank file of iteration 4 matches its recorded sha256
    record = json.load(open(os.path.join(save, "iter_0000002", "checksums.json")))
    assert list(record["sha256"]) == ["mp_rank_00/model_optim_rng.pt"]
