"""The Megatron-Core rank-file format shared by training (mindspeed_dsv.training.checkpointing) and the converter
(ckpt_convert): file and tracker names, iteration directories, the tracker, the checksum record of an iteration,
what an interrupted save leaves behind, reading one rank file, the side files a checkpoint directory carries. Both
import it from here; neither imports the other (tests/layout/test_imports.py).

Writes never leave the tracker pointing at a missing or half-written iteration: the iteration is written under
a temporary name (`iter_N.tmp`, `iter_N.partial-PID`), fsynced and renamed (swapped in atomically where the
iteration already exists), then the tracker moves (temporary file, fsync, rename), then what is replaced goes.
Temporaries an interrupted save left behind are removed by the next save into the same directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Iterable

import torch

from mindspeed_dsv.files import sha256_file, write_json_atomic, write_text_atomic

CKPT_FILE = "model_optim_rng.pt"
TRACKER = "latest_checkpointed_iteration.txt"
CHECKSUMS = "checksums.json"
# what an interrupted save leaves: iter_N.tmp (training), iter_N.partial-PID (hf2mcore/reshard),
# iter_N.old-PID (replace_dir without atomic exchange), NAME.tmp files (atomic single-file writes)
_STALE = re.compile(r"^(iter_\d+|release)\.(tmp|partial-\d+|old-\d+)$|\.tmp$")
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


def write_tracker(save_dir: str, iteration: int | str) -> None:
    """Point the directory at `iteration` (temporary file, fsync, rename): call once that iteration is complete."""
    write_text_atomic(os.path.join(save_dir, TRACKER), str(iteration))


def clean_stale_temporaries(save_dir: str) -> list[str]:
    """Remove what an interrupted save into `save_dir` left behind (see _STALE). Returns the removed names."""
    removed = []
    for name in sorted(os.listdir(save_dir)) if os.path.isdir(save_dir) else []:
        if not _STALE.search(name):
            continue
        path = os.path.join(save_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        removed.append(name)
    return removed


def checkpoint_contents(save_dir: str) -> list[str]:
    """The saved iterations (and tracker) in `save_dir`, temporaries excluded: what a save there could replace."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(n for n in os.listdir(save_dir) if n == TRACKER
                  or (re.fullmatch(r"iter_\d+|release", n) and os.path.isdir(os.path.join(save_dir, n))))


# ---------------------------------------------------------------------------------------------- checksums
def write_checksums(iter_dir: str, digests: dict[str, str]) -> None:
    """Record the sha256 of every file of an iteration (paths relative to it) in iter_dir/checksums.json;
    written inside the iteration before it is renamed in, so the record and the files move together."""
    write_json_atomic(os.path.join(iter_dir, CHECKSUMS),
                      {"algorithm": "sha256", "sha256": dict(sorted(digests.items()))})


def verify_file(path: str) -> None:
    """Compare a file of a rank directory (iter_N/mp_rank_XX/FILE) with the sha256 recorded in iter_N/checksums.json.
    Iterations written before checksums were recorded have no record and pass. Raises naming the file."""
    iter_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    rec = os.path.join(iter_dir, CHECKSUMS)
    if not os.path.isfile(rec):
        return
    try:
        with open(rec) as f:
            recorded = json.load(f)["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise McoreCheckpointError(f"{rec}: not a checksum record ({e})") from None
    rel = os.path.relpath(os.path.abspath(path), iter_dir).replace(os.sep, "/")
    if rel not in recorded:
        return
    got = sha256_file(path)
    if got != recorded[rel]:
        raise McoreCheckpointError(
            f"{path}: sha256 {got} differs from {recorded[rel]} recorded in {rec}: the file is corrupt (flipped or "
            "changed bytes); restore it, or pass --no-verify-checksums to load it anyway")


def verify_iteration(load_dir: str) -> int:
    """Check every file recorded in the current iteration's checksums.json; returns how many were checked."""
    iter_dir = os.path.join(load_dir, iter_dir_name(read_iteration(load_dir)))
    rec = os.path.join(iter_dir, CHECKSUMS)
    if not os.path.isfile(rec):
        return 0
    with open(rec) as f:
        names = list(json.load(f).get("sha256", {}))
    for rel in names:
        path = os.path.join(iter_dir, rel)
        if not os.path.isfile(path):
            raise McoreCheckpointError(f"{path}: listed in {rec} but missing")
        verify_file(path)
    return len(names)


def load_rank_file(path: str, verify: bool = True) -> dict:
    """Memory-map a rank file; with `verify`, first compare its bytes with the iteration's checksums.json."""
    if not os.path.isfile(path):
        raise McoreCheckpointError(f"missing rank file {path}")
    if verify:
        verify_file(path)
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise McoreCheckpointError(f"{path}: cannot be read as a torch checkpoint ({e})") from None


def copy_side_files(src: str, dst: str, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
    copied = []
    for n in names:
        p = os.path.join(src, n)
        if os.path.isfile(p):
            tmp = os.path.join(dst, n + ".tmp")
            shutil.copyfile(p, tmp)
            os.replace(tmp, os.path.join(dst, n))
            copied.append(n)
    return copied
