"""Writes never destroy data (issue 18 items 1-3, 5): a non-empty --save-dir is refused unless --overwrite, which
replaces only what the new output holds; every rank file / HF shard we write has its sha256 recorded and checked
when it is read, so a flipped byte is an error naming the file."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from ckpt_convert.cli import main as cli
from mindspeed_dsv.files import sha256_file
from ckpt_convert.hf_io import INDEX, HFReader, read_all
from ckpt_convert.mcore_io import TRACKER, load_rank_file, rank_file, read_iteration
from mindspeed_dsv.layout import ParallelLayout
from tests.ckpt.helpers import make_hf_dir

EMBED = "embedding.word_embeddings.weight"
HF_EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def hfs(tmp_path_factory):
    root = tmp_path_factory.mktemp("writes")
    return make_hf_dir(str(root / "a"), mtp=False, seed=0), make_hf_dir(str(root / "b"), mtp=False, seed=1)


def _hf2mcore(src, dst, *extra):
    return cli(["hf2mcore", "--load-dir", src, "--save-dir", dst, "--no-progress", "--mtp-num-layers", "0", *extra])


def _mcore2hf(src, dst, *extra):
    return cli(["mcore2hf", "--load-dir", src, "--save-dir", dst, "--no-progress", *extra])


def _snapshot(d):
    """Every file under d with its sha256: equal snapshots mean nothing was touched."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = sha256_file(p)
    return out


def _embed(mcore_dir, iteration=None):
    layout = ParallelLayout.load(mcore_dir)
    it = iteration or read_iteration(mcore_dir)
    return load_rank_file(rank_file(mcore_dir, layout, 0, 0, 0, it))["model"][EMBED]


def _hf_embed(hf_dir):
    return read_all(hf_dir)[HF_EMBED]


def test_hf2mcore_refuses_a_trained_directory_and_overwrite_keeps_other_iterations(hfs, tmp_path, capsys):
    a, b = hfs
    ckpt = str(tmp_path / "ckpt")
    assert _hf2mcore(a, ckpt) == 0
    # a "trained" directory: iterations 1..3, tracker at 3
    for it in (2, 3):
        shutil.copytree(os.path.join(ckpt, "iter_0000001"), os.path.join(ckpt, f"iter_{it:07d}"))
    with open(os.path.join(ckpt, TRACKER), "w") as f:
        f.write("3")
    before = _snapshot(ckpt)
    capsys.readouterr()
    assert _hf2mcore(b, ckpt) == 2
    err = capsys.readouterr().err
    assert "--save-dir" in err and ckpt in err and "--overwrite" in err and "tracker at 3" in err, err
    assert _snapshot(ckpt) == before  # nothing written

    # layout.json describes the whole directory: a new layout would misdescribe the kept iterations
    assert _hf2mcore(b, ckpt, "--overwrite", "--target-tensor-parallel-size", "2") == 2
    err = capsys.readouterr().err
    assert "iter_0000002" in err and "(tp): 1 != 2" in err, err
    assert _snapshot(ckpt) == before

    assert _hf2mcore(b, ckpt, "--overwrite") == 0
    after = _snapshot(ckpt)
    for rel, digest in before.items():  # other iterations byte for byte as they were
        if rel.startswith(("iter_0000002", "iter_0000003")):
            assert after[rel] == digest, rel
    assert read_iteration(ckpt) == "1"
    assert torch.equal(_embed(ckpt, 1), _hf_embed(b))  # iteration 1 now holds b
    assert torch.equal(_embed(ckpt, 2), _hf_embed(a))
    assert not [n for n in os.listdir(ckpt) if "partial" in n or n.endswith(".tmp")]


def test_reshard_refuses_a_non_empty_directory(hfs, tmp_path, capsys):
    a, _ = hfs
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    assert _hf2mcore(a, src) == 0
    os.makedirs(dst)
    open(os.path.join(dst, "notes.txt"), "w").close()
    assert cli(["reshard", "--load-dir", src, "--save-dir", dst, "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(dst) == ["notes.txt"]
    assert cli(["reshard", "--load-dir", src, "--save-dir", src, "--no-progress"]) == 2
    assert "inside) --load-dir" in capsys.readouterr().err


def test_mcore2hf_refuses_an_hf_directory_and_overwrite_removes_its_weights(hfs, tmp_path, capsys):
    a, b = hfs
    mc = str(tmp_path / "mc")
    assert _hf2mcore(b, mc) == 0
    out = str(tmp_path / "out")
    shutil.copytree(a, out)  # the original HF model: a single model.safetensors
    with open(os.path.join(out, "pytorch_model.bin"), "wb") as f:
        f.write(b"old weights")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("my notes")
    assert "model.safetensors" in os.listdir(out)
    before = _snapshot(out)
    capsys.readouterr()
    assert _mcore2hf(mc, out) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "--overwrite" in err, err
    assert _snapshot(out) == before

    assert _mcore2hf(mc, out, "--overwrite") == 0
    names = sorted(os.listdir(out))
    index = json.load(open(os.path.join(out, INDEX)))
    shards = sorted(set(index["weight_map"].values()))
    # the only weight files left are the new export's
    assert sorted(n for n in names if n.endswith((".safetensors", ".bin"))) == shards
    assert open(os.path.join(out, "README.md")).read() == "my notes"  # not a weight file: kept
    assert "tokenizer.json" in names
    assert torch.equal(read_all(out)[HF_EMBED], _hf_embed(b))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.")]  # no staging directory left


def test_mcore2hf_into_its_own_load_dir_is_refused_before_writing(hfs, tmp_path, capsys):
    a, _ = hfs
    mc = str(tmp_path / "mc")
    assert _hf2mcore(a, mc) == 0
    before = _snapshot(mc)
    for dst in (mc, os.path.join(mc, "hf")):
        assert _mcore2hf(mc, dst) == 2
        assert "(inside) the source checkpoint" in capsys.readouterr().err
        assert _snapshot(mc) == before


def _flip(path, offset_fraction=0.6):
    """Change one byte in place (same size)."""
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * offset_fraction))
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x5A]))


def test_checksums_recorded_and_a_flipped_byte_names_the_file(hfs, tmp_path, capsys):
    a, _ = hfs
    mc = str(tmp_path / "mc")
    assert _hf2mcore(a, mc) == 0
    layout = ParallelLayout.load(mc)
    path = rank_file(mc, layout, 0, 0, 0, 1)
    record = json.load(open(os.path.join(mc, "iter_0000001", "checksums.json")))
    assert record["sha256"] == {"mp_rank_00/model_optim_rng.pt": sha256_file(path)}  # hashlib of the bytes

    hf = str(tmp_path / "hf")
    assert _mcore2hf(mc, hf) == 0
    index = json.load(open(os.path.join(hf, INDEX)))
    for shard, digest in index["metadata"]["sha256"].items():
        assert sha256_file(os.path.join(hf, shard)) == digest

    size = os.path.getsize(path)
    _flip(path)
    assert os.path.getsize(path) == size
    capsys.readouterr()
    assert _mcore2hf(mc, str(tmp_path / "hf2")) == 2
    err = capsys.readouterr().err
    assert path in err and "sha256" in err and "--no-verify-checksums" in err, err
    assert not os.path.exists(tmp_path / "hf2")
    with pytest.raises(ValueError, match="model_optim_rng.pt: sha256"):
        load_rank_file(path)  # what training's --load calls
    tokens = tmp_path / "tokens.json"
    tokens.write_text("[[1, 2, 3]]")
    assert cli(["verify", "--hf-dir", a, "--mcore-dir", mc, "--tokens-file", str(tokens)]) == 2
    assert path in capsys.readouterr().err
    # skipping the check reads the file (the flipped byte lies in tensor data)
    assert _mcore2hf(mc, str(tmp_path / "hf3"), "--no-verify-checksums") == 0

    shard = os.path.join(hf, sorted(index["metadata"]["sha256"])[0])
    _flip(shard)
    assert _hf2mcore(hf, str(tmp_path / "back")) == 2
    assert shard in capsys.readouterr().err
    assert _hf2mcore(hf, str(tmp_path / "back2"), "--no-verify-checksums") == 0


def test_peft_export_refuses_a_non_empty_directory_and_overwrite_replaces_its_weights(hfs, tmp_path, capsys):
    from tests.ckpt.test_lora import ALPHA, R, write_adapter_ckpt

    a, _ = hfs
    mc, lora, out = str(tmp_path / "mc"), str(tmp_path / "lora"), tmp_path / "peft"
    assert _hf2mcore(a, mc) == 0
    write_adapter_ckpt(mc, lora, read_all(a), with_experts=False, with_mlp=False)
    os.makedirs(out)
    (out / "adapter_model.bin").write_bytes(b"an earlier export")
    (out / "notes.txt").write_text("mine")
    argv = ["--save-lora-to-hf", "--lora-r", str(R), "--lora-alpha", str(ALPHA)]
    capsys.readouterr()
    assert _mcore2hf(lora, str(out), *argv) == 2
    assert "adapter_model.bin" in capsys.readouterr().err
    assert _mcore2hf(lora, str(out), *argv, "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert json.load(open(out / "adapter_config.json"))["r"] == R
