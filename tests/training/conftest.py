"""Shared fixtures: tokenized tiny datasets and a converted tiny HF checkpoint, made once per session."""

import os
import subprocess
import sys

import pytest

from tests.model.hf_reference import ROOT, make_hf_model, tiny_hf_config

PY = sys.executable


def _run(args):
    subprocess.run([PY, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    tok = os.path.join(ROOT, "assets", "tiny_deepseek3")
    _run(["preprocess_data.py", "--input", "assets/data/alpaca_builtins.jsonl", "--output-prefix", str(out / "sft"),
          "--tokenizer-name-or-path", tok, "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type",
          "deepseek3", "--seq-length", "128", "--pack", "--no-progress"])
    _run(["preprocess_data.py", "--input", "assets/data/pretrain_pydoc.jsonl", "--output-prefix", str(out / "pt"),
          "--tokenizer-name-or-path", tok, "--append-eod", "--no-progress"])
    return {"sft": str(out / "sft"), "pretrain": str(out / "pt_text_document")}


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny DeepseekV3ForCausalLM saved the way transformers saves it, with the tokenizer beside it."""
    from ckpt_convert.hf_io import copy_side_files

    out = tmp_path_factory.mktemp("hf")
    model = make_hf_model(tiny_hf_config(num_nextn_predict_layers=0), seed=7)
    model.save_pretrained(out)
    copy_side_files(os.path.join(ROOT, "assets", "tiny_deepseek3"), str(out))
    return str(out)


def hf2mcore(hf_dir, save_dir, *layout_flags):
    from ckpt_convert.cli import main

    assert main(["hf2mcore", "--load-dir", hf_dir, "--save-dir", save_dir, "--no-progress", *layout_flags]) == 0
    return save_dir


@pytest.fixture(scope="session")
def v4_inputs(tmp_path_factory):
    """The tiny DeepSeek-V4 config, tokenizer and unpacked SFT data (deepseek4_fixtures)."""
    from tests.training.deepseek4_fixtures import make_v4_inputs

    return make_v4_inputs(str(tmp_path_factory.mktemp("v4")))
