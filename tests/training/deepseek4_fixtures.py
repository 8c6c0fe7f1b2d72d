"""Tiny DeepSeek-V4 training inputs: the tiny V4 config with the tiny tokenizer's vocabulary (4096) beside the
tokenizer, and unpacked SFT data (V4 attends positions 0..S-1, so no packing). Made once per session
(conftest.v4_inputs) for both V4 training files; the tokenizer runs in this process, not in a subprocess."""

from __future__ import annotations

import json
import os
import shutil

from tests.training.conftest import ROOT

SEQ = 64


def make_v4_inputs(out: str) -> dict:
    from mindspeed_dsv.data.preprocess import main as preprocess

    model = os.path.join(out, "model")
    os.makedirs(model, exist_ok=True)
    tok = os.path.join(ROOT, "assets", "tiny_deepseek3")
    for name in os.listdir(tok):
        if name != "config.json":
            shutil.copy(os.path.join(tok, name), model)
    with open(os.path.join(ROOT, "assets", "tiny_deepseek4", "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["vocab_size"] = 4096  # the tiny tokenizer's
    with open(os.path.join(model, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    assert preprocess(["--input", os.path.join(ROOT, "assets", "data", "alpaca_builtins.jsonl"), "--output-prefix",
                       os.path.join(out, "sft"), "--tokenizer-name-or-path", model, "--handler-name",
                       "AlpacaStyleInstructionHandler", "--prompt-type", "deepseek3", "--seq-length", str(SEQ),
                       "--no-progress"]) == 0
    return {"model": model, "sft": os.path.join(out, "sft")}


def v4_args(inputs: dict, *extra: str) -> list[str]:
    """SFT on the tiny V4; MTP as config.json has it (num_nextn_predict_layers = 1) unless `extra` says."""
    return ["--data-path", inputs["sft"], "--is-instruction-dataset", "--model-config", inputs["model"],
            "--seq-length", str(SEQ), "--micro-batch-size", "2", "--lr", "3e-3", "--min-lr", "3e-4", "--seed", "5",
            "--log-interval", "1000", *extra]
