"""scripts/make_tiny_hf_checkpoint.py on the tiny DeepSeek-V4 config (what examples/mcore/deepseek4/quickstart_tiny.sh
runs): the vocabulary of the tiny V4 tokenizer, a hash table our model accepts, and a checkpoint transformers
reads back."""

import json
import os
import sys

import torch

from ckpt_convert.hf_io import read_all
from tests.ckpt.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))


def test_tiny_v4_checkpoint(tmp_path):
    from make_tiny_hf_checkpoint import main
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mindspeed_dsv.models.deepseek4.config import DeepSeekV4Config

    hf = tmp_path / "hf"
    cfg_dir = os.path.join(ROOT, "assets", "tiny_deepseek4")
    assert main(["--config", cfg_dir, "--vocab-size", "4096", "--save-dir", str(hf)]) == 0
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v4" and cfg["vocab_size"] == 4096
    assert len(AutoTokenizer.from_pretrained(hf)) == 4096  # the tiny V4 tokenizer came along
    sd = read_all(str(hf))
    v4 = DeepSeekV4Config.from_hf(cfg)
    tables = {k: t for k, t in sd.items() if k.endswith("tid2eid")}
    assert len(tables) == v4.n_hash_layers == 2
    for t in tables.values():  # every token: k distinct experts in range (transformers' init: all zeros)
        assert t.shape == (4096, v4.num_experts_per_tok)
        assert int(t.min()) >= 0 and int(t.max()) < v4.n_routed_experts
        assert bool((t.sort(dim=-1).values.diff(dim=-1) > 0).all())
    back = AutoModelForCausalLM.from_pretrained(hf)
    # written under transformers' own names (the spelling ckpt_convert reads), every tensor read back as written
    assert set(sd) == set(back.state_dict())
    for k, t in back.state_dict().items():
        assert torch.equal(t, sd[k].to(t.dtype)), k


def test_tiny_v4_checkpoint_refuses_mtp(tmp_path):
    import pytest

    from make_tiny_hf_checkpoint import main

    with pytest.raises(SystemExit, match="DeepSeek-V4 MTP weights are not written yet"):
        main(["--config", os.path.join(ROOT, "assets", "tiny_deepseek4"), "--save-dir", str(tmp_path / "x"), "--mtp"])
