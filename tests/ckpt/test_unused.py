"""hf2mcore names every HF tensor it does not convert and refuses unless --allow-unused-weights; the MTP layer's
copies of the embedding and output head are compared with the main tensors, not assumed equal."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ckpt_convert.cli import main
from ckpt_convert.hf_io import read_all
from tests.ckpt.helpers import make_hf_dir

N = 4  # num_hidden_layers of the tiny config: the MTP layer is model.layers.4


@pytest.fixture(scope="module")
def mtp_dir(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("hf") / "tiny_mtp"), mtp=True)


def run(capsys, *args):
    code = main(list(args) + ["--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def rank_keys(save_dir):
    sd = torch.load(os.path.join(save_dir, "iter_0000001", "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    return set(sd["model"])


def with_extra(src, dst, extra):
    """A copy of HF directory `src` with one more shard holding `extra` (listed in the index)."""
    shutil.copytree(src, dst)
    save_file(extra, os.path.join(dst, "model-extra.safetensors"))
    idx = os.path.join(dst, "model.safetensors.index.json")
    wm = json.load(open(idx))["weight_map"]
    wm.update({k: "model-extra.safetensors" for k in extra})
    json.dump({"metadata": {}, "weight_map": wm}, open(idx, "w"))
    return str(dst)


def test_extra_tensor_refused_then_allowed(mtp_dir, tmp_path, capsys):
    extra = "model.layers.1.self_attn.rotary_emb.inv_freq"
    src = with_extra(mtp_dir, tmp_path / "extra", {extra: torch.arange(8.0)})
    code, _, err = run(capsys, "hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "out"))
    assert code == 2 and "1 tensor(s) would not be converted" in err and f"{extra} [8]" in err, err
    assert "--allow-unused-weights" in err
    assert not (tmp_path / "out" / "latest_checkpointed_iteration.txt").exists()

    code, out, err = run(capsys, "hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "out"),
                         "--allow-unused-weights")
    assert code == 0, err
    assert json.loads(out)["unused"] == [extra] and "1 tensor(s)" in err
    # Everything else did arrive: the MTP layer's tensors are in the rank file.
    assert "mtp.layers.0.eh_proj.weight" in rank_keys(str(tmp_path / "out"))


def test_dropping_mtp_names_its_tensors(mtp_dir, tmp_path, capsys):
    code, _, err = run(capsys, "hf2mcore", "--load-dir", mtp_dir, "--save-dir", str(tmp_path / "out"),
                       "--mtp-num-layers", "0")
    hf_mtp = sorted(k for k in read_all(mtp_dir) if k.startswith(f"model.layers.{N}."))
    assert code == 2 and f"{len(hf_mtp)} tensor(s) would not be converted" in err, err
    assert f"model.layers.{N}.eh_proj.weight" in err and f"model.layers.{N}.embed_tokens.weight" in err
    code, out, err = run(capsys, "hf2mcore", "--load-dir", mtp_dir, "--save-dir", str(tmp_path / "out"),
                         "--mtp-num-layers", "0", "--allow-unused-weights")
    assert code == 0, err
    assert json.loads(out)["unused"] == hf_mtp
    assert not any(k.startswith("mtp.") for k in rank_keys(str(tmp_path / "out")))


@pytest.mark.parametrize("copy,main_name", [("embed_tokens.weight", "model.embed_tokens.weight"),
                                            ("shared_head.head.weight", "lm_head.weight")])
def test_mtp_copy_that_differs_is_refused(mtp_dir, tmp_path, capsys, copy, main_name):
    d = tmp_path / "differs"
    shutil.copytree(mtp_dir, d)
    shard = d / "model-mtp.safetensors"
    t = read_all(str(d))
    mtp = {k: v for k, v in t.items() if k.startswith(f"model.layers.{N}.")}
    mtp[f"model.layers.{N}.{copy}"][7, 3] += 0.5
    save_file(mtp, str(shard))
    code, _, err = run(capsys, "hf2mcore", "--load-dir", str(d), "--save-dir", str(tmp_path / "out"))
    assert code == 2 and f"model.layers.{N}.{copy} differs from {main_name} (first at row 7, max |diff| 0.5)" in err, err
    # --allow-unused-weights does not hide it: the copy is used (compared), and it is wrong.
    code, _, err = run(capsys, "hf2mcore", "--load-dir", str(d), "--save-dir", str(tmp_path / "out"),
                       "--allow-unused-weights")
    assert code == 2 and "differs from" in err
