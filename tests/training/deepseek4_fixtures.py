"""Tiny DeepSeek-V4 training inputs: the tiny V4 config with the tiny tokenizer's vocabulary (4096) beside the
tokenizer, unpacked SFT data (V4 attends positions 0..S-1, so no packing) and pretraining data."""

from __future__ import annotations

import json
import os
import shutil

from tests.training.conftest import ROOT, _run

SEQ = 64


def make_v4_inputs(out: str) -> dict:
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
    _run(["preprocess_data.py", "--input", "assets/data/alpaca_builtins.jsonl", "--output-prefix",
          os.path.join(out, "sft"), "--tokenizer-name-or-path", model, "--handler-name",
          "AlpacaStyleInstructionHandler", "--prompt-type", "deepseek3", "--seq-length", str(SEQ), "--no-progress"])
    _run(["preprocess_data.py", "--input", "assets/data/pretrain_pydoc.jsonl", "--output-prefix",
          os.path.join(out, "pt"), "--tokenizer-name-or-path", model, "--append-eod", "--no-progress"])
    return {"model": model, "sft": os.path.join(out, "sft"), "pretrain": os.path.join(out, "pt_text_document")}


def v4_args(inputs: dict, kind: str, *extra: str) -> list[str]:
    data = ["--data-path", inputs["sft"], "--is-instruction-dataset"] if kind == "sft" else \
        ["--data-path", inputs["pretrain"]]
    return [*data, "--model-config", inputs["model"], "--mtp-num-layers", "0", "--seq-length", str(SEQ),
            "--micro-batch-size", "2", "--lr", "3e-3", "--min-lr", "3e-4", "--seed", "5", "--log-interval", "1000",
            *extra]
