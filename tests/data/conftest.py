import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(REPO, "assets", "tiny_deepseek3")
DATA = os.path.join(REPO, "assets", "data")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def run_preprocess(tmp_path, name, input_path, handler="GeneralPretrainHandler", *extra):
    """Run the CLI entry in-process; returns (exit code, output prefix)."""
    from mindspeed_dsv.data.preprocess import main

    prefix = str(tmp_path / name)
    rc = main(["--input", str(input_path), "--output-prefix", prefix, "--tokenizer-name-or-path", TOKENIZER,
               "--handler-name", handler, "--no-progress", *extra])
    return rc, prefix
