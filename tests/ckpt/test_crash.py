"""A writer killed (SIGKILL) at any moment leaves a complete old or new state (issue 14.8, 18.18).

Each writer runs in a child forked from tests.dist_utils' fork server (torch already imported: fast; a clean
process, where a child forked from the test process would inherit its torch.distributed state if an earlier test
there initialised one, and hang tearing it down) with the test process's environment and MINDSPEED_DSV_CRASH_AT
naming one mindspeed_dsv.files.crash_point; the child kills itself there. The directory must then read as the whole old state or the whole new one (the
tracker / index points at files that exist and match their recorded sha256, and the weights are all old or all
new), and the next write removes what the killed one left behind."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
import torch

from mindspeed_dsv.files import CRASH_ENV, sha256_file
from ckpt_convert.hf_io import INDEX, read_all
from ckpt_convert.mcore_io import load_rank_file, rank_file, read_iteration, verify_iteration
from mindspeed_dsv.layout import ParallelLayout
from tests.ckpt.helpers import make_hf_dir
from tests.dist_utils import fork_server_context

HF_EMBED = "model.embed_tokens.weight"


def _child(fn, args, env):
    os.environ.clear()
    os.environ.update(env)
    os._exit(fn(*args) or 0)


def _run(fn, *args, crash=None, env=None) -> int:
    """Exit code of fn(*args) run in a forked child; -SIGKILL when it reached crash point `crash`."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV} | dict(env or {})
    if crash:
        env[CRASH_ENV] = crash
    p = fork_server_context().Process(target=_child, args=(fn, args, env))
    p.start()
    p.join(300)
    return p.exitcode


def _cli(argv):
    from ckpt_convert.cli import main

    return main(argv)


def _convert(cmd, src, dst, crash=None, *extra):
    return _run(_cli, [cmd, "--load-dir", src, "--save-dir", dst, "--no-progress", *extra], crash=crash)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    a, b = make_hf_dir(str(root / "a"), mtp=False, seed=0), make_hf_dir(str(root / "b"), mtp=False, seed=1)
    from ckpt_convert.cli import main

    for hf, mc in ((a, root / "mc_a"), (b, root / "mc_b")):
        assert main(["hf2mcore", "--load-dir", hf, "--save-dir", str(mc), "--no-progress", "--mtp-num-layers", "0"]) == 0
    return {"a": a, "b": b, "mc_a": str(root / "mc_a"), "mc_b": str(root / "mc_b"),
            "emb_a": read_all(a)[HF_EMBED], "emb_b": read_all(b)[HF_EMBED]}


def _mcore_state(d, dirs) -> str:
    """'a' or 'b': which complete conversion `d` holds (raises if it holds neither completely)."""
    assert verify_iteration(d) == 1  # tracker -> iteration whose every recorded file exists with its sha256
    json.load(open(os.path.join(d, "config.json")))
    layout = ParallelLayout.load(d)
    emb = load_rank_file(rank_file(d, layout, 0, 0, 0, read_iteration(d)))["model"]["embedding.word_embeddings.weight"]
    return "a" if torch.equal(emb, dirs["emb_a"]) else "b" if torch.equal(emb, dirs["emb_b"]) else "mixed"


@pytest.mark.parametrize("point", ["hf2mcore:iteration_written", "replace_dir:swapped", "hf2mcore:iteration_in_place",
                                   "hf2mcore:tracker_written"])
def test_hf2mcore_killed(dirs, tmp_path, point):
    import shutil

    d = str(tmp_path / "ckpt")
    shutil.copytree(dirs["mc_a"], d)
    assert _convert("hf2mcore", dirs["b"], d, point, "--mtp-num-layers", "0", "--overwrite") == -signal.SIGKILL
    state = _mcore_state(d, dirs)
    assert state == ("a" if point == "hf2mcore:iteration_written" else "b"), state
    leftovers = [n for n in os.listdir(d) if ".partial-" in n or n.endswith(".tmp")]
    if point in ("hf2mcore:iteration_written", "replace_dir:swapped"):
        assert leftovers, "the kill should have left a temporary behind for the next save to clean"
    assert _convert("hf2mcore", dirs["b"], d, None, "--mtp-num-layers", "0", "--overwrite") == 0
    assert _mcore_state(d, dirs) == "b"
    assert not [n for n in os.listdir(d) if ".partial-" in n or n.endswith(".tmp")]


def _hf_state(d, dirs) -> str:
    """'a' or 'b': which complete HF export `d` holds. Every weight file is in the index (no stray shards)."""
    index = json.load(open(os.path.join(d, INDEX)))
    shards = sorted(set(index["weight_map"].values()))
    assert sorted(n for n in os.listdir(d) if n.endswith(".safetensors")) == shards
    for s in shards:
        assert sha256_file(os.path.join(d, s)) == index["metadata"]["sha256"][s]
    emb = read_all(d)[HF_EMBED]
    return "a" if torch.equal(emb, dirs["emb_a"]) else "b" if torch.equal(emb, dirs["emb_b"]) else "mixed"


@pytest.mark.parametrize("point", ["hf_export:written", "replace_dir:swapped", "hf_export:published"])
def test_mcore2hf_killed(dirs, tmp_path, point):
    out = str(tmp_path / "hf_out")
    assert _convert("mcore2hf", dirs["mc_a"], out) == 0
    assert _convert("mcore2hf", dirs["mc_b"], out, point, "--overwrite") == -signal.SIGKILL
    assert _hf_state(out, dirs) == ("a" if point == "hf_export:written" else "b")
    if point != "hf_export:published":
        assert len(os.listdir(tmp_path)) == 2  # the staging directory (new, or the swapped-out old) is left
    assert _convert("mcore2hf", dirs["mc_b"], out, None, "--overwrite") == 0
    assert _hf_state(out, dirs) == "b"
    assert sorted(os.listdir(tmp_path)) == ["hf_out"]  # the killed run's staging directory is gone


# ----------------------------------------------------------------------------------------------- training
def _train_save_worker(save_dir: str, layout_dir: str, crash: str, iteration: int) -> None:
    """One gloo rank: save iteration 1 (weights 1.0), then, with the crash point armed, `iteration` (weights 2.0)
    through the trainer's save_checkpoint."""
    from mindspeed_dsv.platform import init_distributed
    from mindspeed_dsv.training.checkpointing import save_checkpoint

    init_distributed(seed=1)
    layout = ParallelLayout.load(layout_dir)
    model = torch.nn.Linear(4, 4, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)
    save_checkpoint(save_dir, 1, [model], None, None, 0, layout, None, {"old": True}, save_optim=False, save_rng=False)
    os.environ[CRASH_ENV] = crash
    torch.nn.init.constant_(model.weight, 2.0)
    save_checkpoint(save_dir, iteration, [model], None, None, 0, layout, None, {"old": False},
                    save_optim=False, save_rng=False)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("point,iteration", [("train_save:iteration_written", 2), ("train_save:iteration_in_place", 2),
                                             ("train_save:tracker_written", 2), ("replace_dir:swapped", 1)],
                         ids=["written", "in_place", "tracker", "same_iteration_swapped"])
def test_training_save_killed(dirs, tmp_path, point, iteration):
    d = str(tmp_path / "ckpt")
    env = {"MINDSPEED_DSV_DEVICE": "cpu", "MASTER_PORT": _free_port(), "RANK": "0", "WORLD_SIZE": "1"}
    assert _run(_train_save_worker, d, dirs["mc_a"], point, iteration, env=env) == -signal.SIGKILL
    assert verify_iteration(d) == 1
    it = read_iteration(d)
    w = load_rank_file(rank_file(d, ParallelLayout.load(d), 0, 0, 0, it))["model"]["weight"]
    new = point in ("train_save:tracker_written", "replace_dir:swapped")
    assert it == str(iteration if new else 1) and w.unique().tolist() == [2.0 if new else 1.0], (it, w)
    # the next save (a resumed run) removes the killed save's temporaries
    assert _run(_train_save_worker, d, dirs["mc_a"], "none", 3, env=dict(env, MASTER_PORT=_free_port())) == 0
    assert read_iteration(d) == "3" and verify_iteration(d) == 1
    assert not [n for n in os.listdir(d) if n.endswith((".tmp",)) or ".partial-" in n or ".old-" in n]
