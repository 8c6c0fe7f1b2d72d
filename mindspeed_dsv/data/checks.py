"""Checks of the data-side inputs (tokenizer directory, Megatron datasets) that name the file and the fix.

Run before any model exists (the trainer's ``setup``, ``preprocess``), so a wrong path or a truncated file is
one line naming it instead of a traceback from transformers, numpy or the embedding lookup.

    load_tokenizer("assets/tiny_deepseek3")              # AutoTokenizer, or InputError naming the directory/file
    check_indexed_dataset("out/pt_text_document")        # -> number of sequences; InputError if truncated
    check_data_kind(["out/alpaca"], instruction=False)   # InputError: instruction data, use posttrain_gpt.py
    find_out_of_vocab("out/pt_text_document", 4096)      # -> (sequence, position, id) or None
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import List, Optional, Sequence, Tuple

import numpy as np

from mindspeed_dsv.data.datasets import sft_dataset_prefixes


class InputError(ValueError):
    """A missing, truncated or mismatched input file; the message names it and says what to do."""


# ------------------------------------------------------------------------------------------------ tokenizer
def check_tokenizer_dir(path: str, flag: str = "--tokenizer-name-or-path") -> None:
    """The directory exists and its tokenizer.json (when present) is whole JSON. Only local directories are
    supported (nothing is downloaded), so a missing one is named instead of transformers' "Repo id must be ..."."""
    if not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise InputError(f"{flag} {path}: the tokenizer directory {what} (give the directory that holds "
                         "tokenizer.json and tokenizer_config.json)")
    tj = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tj):
        try:
            with open(tj, encoding="utf-8") as f:
                json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{tj}: not valid JSON ({e}; {os.path.getsize(tj)} bytes): the file is truncated "
                             "or corrupt; copy it again from the model's release") from None
    elif not os.path.isfile(os.path.join(path, "tokenizer.model")):
        raise InputError(f"{flag} {path}: neither tokenizer.json nor tokenizer.model is in this directory")


def load_tokenizer(path: str, flag: str = "--tokenizer-name-or-path"):
    """transformers' AutoTokenizer of a local directory, after ``check_tokenizer_dir``."""
    check_tokenizer_dir(path, flag)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{flag} {path}: transformers cannot load this tokenizer ({e})") from None


# ------------------------------------------------------------------------------------------------ datasets
# Megatron's .idx header (megatron.core.datasets.indexed_dataset._IndexWriter): magic, version <Q, dtype code <B,
# sequence count <Q, document count <Q; then int32 lengths, int64 pointers, int64 document indices. Read here
# only to compare the promised sizes with the files' (megatron reads them without checking).
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<QBQQ")
_IDX_HEAD_LEN = len(_IDX_MAGIC) + _IDX_HEADER.size


def _idx_header(prefix: str) -> Tuple[int, int, int, int]:
    """(dtype size, sequences, documents, expected .idx size)."""
    from megatron.core.datasets.indexed_dataset import DType

    idx = prefix + ".idx"
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEAD_LEN)
    if len(head) < _IDX_HEAD_LEN or head[:len(_IDX_MAGIC)] != _IDX_MAGIC:
        why = f"truncated ({size} bytes)" if len(head) < _IDX_HEAD_LEN else "wrong magic bytes"
        raise InputError(f"{idx}: not a Megatron index file ({why}); run preprocess_data.py again")
    _, code, nseq, ndoc = _IDX_HEADER.unpack(head[len(_IDX_MAGIC):])
    try:
        dtype_size = DType.size(DType.dtype_from_code(code))
    except (KeyError, ValueError):
        raise InputError(f"{idx}: unknown dtype code {code} in the header; run preprocess_data.py again") from None
    return dtype_size, nseq, ndoc, _IDX_HEAD_LEN + nseq * (4 + 8) + ndoc * 8


def check_indexed_dataset(prefix: str) -> int:
    """``prefix``.idx/.bin exist and are as long as the index says; returns the number of sequences."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    missing = [p for p in (bin_, idx) if not os.path.isfile(p)]
    if missing:
        raise InputError(f"{' and '.join(missing)} not found (run preprocess_data.py first)")
    dtype_size, nseq, _, want_idx = _idx_header(prefix)
    have_idx = os.path.getsize(idx)
    if have_idx < want_idx:
        raise InputError(f"{idx}: truncated ({have_idx} bytes; its header promises {want_idx} for {nseq} "
                         "sequences); run preprocess_data.py again")
    if nseq == 0:
        raise InputError(f"{prefix}: the dataset holds no sequences; preprocess a non-empty input")
    with open(idx, "rb") as f:
        f.seek(_IDX_HEAD_LEN + 4 * (nseq - 1))
        (last_len,) = struct.unpack("<i", f.read(4))
        f.seek(_IDX_HEAD_LEN + 4 * nseq + 8 * (nseq - 1))
        (last_ptr,) = struct.unpack("<q", f.read(8))
    want_bin, have_bin = last_ptr + last_len * dtype_size, os.path.getsize(bin_)
    if have_bin < want_bin:
        raise InputError(f"{bin_}: truncated ({have_bin} bytes; {idx} needs {want_bin}); copy it again or run "
                         "preprocess_data.py again")
    return nseq


_SFT_NAME = re.compile(r"_packed_(input_ids|labels|attention_mask)_document$")


def check_data_kind(prefixes: Sequence[str], instruction: bool) -> List[str]:
    """The files behind --data-path, checked to be the kind the run reads; returns the dataset prefixes to open.

    Pretraining (pretrain_gpt.py) reads ``PREFIX.bin/.idx``; fine-tuning (posttrain_gpt.py,
    --is-instruction-dataset) reads the three ``PREFIX_packed_*_document`` datasets."""
    out: List[str] = []
    for prefix in prefixes:
        sft = list(sft_dataset_prefixes(prefix).values())
        has_sft = all(os.path.isfile(p + ".idx") for p in sft)
        has_plain = os.path.isfile(prefix + ".idx") or os.path.isfile(prefix + ".bin")
        if instruction:
            if has_sft:
                out.extend(sft)
                continue
            base = _SFT_NAME.sub("", prefix)
            if base != prefix:
                raise InputError(f"--data-path {prefix}: give the prefix without '_packed_..._document': {base}")
            partial = [p for p in sft if not os.path.isfile(p + ".idx")]
            if len(partial) < len(sft):
                raise InputError(f"--data-path {prefix}: {partial[0]}.bin/.idx not found (the instruction dataset "
                                 "is incomplete; run preprocess_data.py again)")
            if has_plain:
                raise InputError(f"--data-path {prefix}: this is pretraining data ({prefix}.bin/.idx); fine-tuning "
                                 "needs an instruction handler's output (preprocess_data.py --handler-name "
                                 "AlpacaStyleInstructionHandler ...), or train it with pretrain_gpt.py")
            raise InputError(f"--data-path {prefix}: {sft[0]}.bin/.idx not found (preprocess the data with an "
                             "instruction handler first)")
        if _SFT_NAME.search(prefix) or (has_sft and not has_plain):
            raise InputError(f"--data-path {prefix}: this is instruction data (input_ids/labels/attention_mask "
                             f"datasets of {_SFT_NAME.sub('', prefix)}); fine-tune it with posttrain_gpt.py "
                             "(or --is-instruction-dataset)")
        if not has_plain:
            raise InputError(f"--data-path {prefix}: {prefix}.bin/.idx not found (run preprocess_data.py first)")
        out.append(prefix)
    return out


def find_out_of_vocab(prefix: str, vocab_size: int, chunk: int = 1 << 22) -> Optional[Tuple[int, int, int]]:
    """(sequence, position, id) of the first token id >= vocab_size in the dataset, or None. Reads the .bin
    once, ``chunk`` tokens at a time (called after a batch held such an id, to name where it came from)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    flat = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
    for start in range(0, len(flat), chunk):
        block = np.asarray(flat[start:start + chunk])
        bad = np.flatnonzero(block.astype(np.int64) >= vocab_size)
        if bad.size:
            at = start + int(bad[0])
            pointers = ds.index.sequence_pointers // ds.index.dtype_size
            seq = int(np.searchsorted(pointers, at, side="right") - 1)
            return seq, at - int(pointers[seq]), int(block[bad[0]])
    return None
