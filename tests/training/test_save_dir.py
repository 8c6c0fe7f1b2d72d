"""Training never saves over another run's checkpoints (issue 18.3): a --save directory that holds checkpoints
this run does not continue is refused before training unless --overwrite; resuming --load DIR --save DIR works."""

import json
import os

import pytest
import torch

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


def test_distributed_optimizer_load_gives_each_state_its_own_step():
    """megatron's DistributedOptimizer.load_state_dict (no TE / Apex) puts one step tensor into every parameter's
    state; torch's AdamW adds to each in place, so a shared tensor would advance once per parameter. After the
    shard load each state holds its own step, and a resumed AdamW step equals the uninterrupted one."""
    import types

    from mindspeed_dsv.training.checkpointing import _load_distributed_optimizer_shards

    def run(steps, params, opt=None):
        opt = opt or torch.optim.AdamW(params, lr=0.1, foreach=True)
        for i in range(steps):
            for j, p in enumerate(params):
                p.grad = torch.full_like(p, 0.1 * (i + 1) * (j + 1))
            opt.step()
        return opt

    straight = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    run(3, straight)
    resumed = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = run(2, resumed)
    shared = torch.tensor(2.0)
    for st in opt.state.values():  # what megatron's load_state_dict leaves
        st["step"] = shared
    loaded = []
    stub = types.SimpleNamespace(optimizer=opt, load_parameter_state=lambda path: loaded.append(path))
    _load_distributed_optimizer_shards(stub, "distrib_optim.pt")
    assert loaded == ["distrib_optim.pt"]
    steps = [st["step"] for st in opt.state.values()]
    assert steps[0] is not steps[1] and all(s.item() == 2.0 for s in steps)
    for j, p in enumerate(resumed):  # the third step, as the straight run took it
        p.grad = torch.full_like(p, 0.1 * 3 * (j + 1))
    opt.step()
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)
