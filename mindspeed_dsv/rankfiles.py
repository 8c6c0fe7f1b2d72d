"""The Megatron-Core rank-file format shared by training (mindspeed_dsv.training.checkpointing) and the converter
(ckpt_convert): file and tracker names, iteration directories, reading one rank file, the side files a checkpoint
directory carries. Both import it from here; neither imports the other (tests/layout/test_imports.py).
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable

import torch

CKPT_FILE = "model_optim_rng.pt"
TRACKER = "latest_checkpointed_iteration.txt"
# Tokenizer and generation files copied next to the weights (HF -> Megatron -> HF).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")


class McoreCheckpointError(ValueError):
    pass


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def read_iteration(load_dir: str) -> str:
    path = os.path.join(load_dir, TRACKER)
    if not os.path.isfile(path):
        raise McoreCheckpointError(f"{load_dir}: no {TRACKER}; not a Megatron checkpoint directory")
    text = open(path).read().strip()
    if text == "release":
        return "release"
    try:
        return str(int(text))
    except ValueError:
        raise McoreCheckpointError(f"{path}: expected an iteration number or 'release', got {text!r}") from None


def load_rank_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise McoreCheckpointError(f"missing rank file {path}")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise McoreCheckpointError(f"{path}: cannot be read as a torch checkpoint ({e})") from None


def copy_side_files(src: str, dst: str, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
    copied = []
    for n in names:
        p = os.path.join(src, n)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(dst, n))
            copied.append(n)
    return copied
