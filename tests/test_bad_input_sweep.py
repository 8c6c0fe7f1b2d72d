"""Bad input through the real command lines: each row runs one CLI as a subprocess and asserts its exit status,
that its output names the file / flag / tensor (regexes), and that the error is one line: no usage block, no
traceback, exactly one `error:` line (issue 18).

To add a row: append a `Row` to ROWS. `argv` and `patterns` may use the placeholders of `Paths` ({hf}, {mcore},
{sft}, {pt}, {tok}, {tmp}); in patterns they are regex-escaped. `setup(paths)` builds the broken input under
`paths.tmp` (one directory per setup function, shared by the rows that use the same function, so group rows
by setup). Fixtures are the session-wide tiny ones of tests/training/conftest.py; keep rows cheap (each is one
process start, ~5 s on one core): errors should come before any model is built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pytest
import torch

from tests.ckpt.helpers import edit_rank_file
from tests.model.hf_reference import ROOT
from tests.training.conftest import hf2mcore, tiny_data, tiny_hf_dir  # noqa: F401 - session fixtures

PY = sys.executable
TOK = os.path.join(ROOT, "assets", "tiny_deepseek3")
PRETRAIN = (PY, "pretrain_gpt.py")
POSTTRAIN = (PY, "posttrain_gpt.py")
CONVERT = (PY, "-m", "ckpt_convert")
PREPROCESS = (PY, "preprocess_data.py")
TRAIN_BASE = ("--model-config", TOK, "--seq-length", "128", "--train-iters", "2", "--micro-batch-size", "1")
# What a one-line error never shows.
NO_NOISE = (r"(?m)^usage:", r"Traceback \(most recent call last\)", r"ChildFailedError")


@dataclass
class Paths:
    hf: str      # tiny HF checkpoint (safetensors + tokenizer), no MTP
    mcore: str   # hf2mcore of it, TP1
    sft: str     # instruction dataset prefix (packed, seq 128)
    pt: str      # pretraining dataset prefix (..._text_document)
    tok: str     # the tiny tokenizer directory
    tmp: str     # the row's setup directory

    def fill(self, text: str, escape: bool = False) -> str:
        for key, value in vars(self).items():
            text = text.replace("{" + key + "}", re.escape(value) if escape else value)
        return text


@dataclass(frozen=True)
class Row:
    name: str
    argv: tuple
    code: int
    patterns: tuple
    setup: Optional[Callable[[Paths], None]] = None
    env: dict = field(default_factory=dict)
    absent: tuple = NO_NOISE


# ------------------------------------------------------------------------------------------------ setups
def truncated_tokenizer(p: Paths):
    shutil.copytree(p.tok, os.path.join(p.tmp, "tok"))
    path = os.path.join(p.tmp, "tok", "tokenizer.json")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def truncated_datasets(p: Paths):
    for kind in ("bin", "idx"):
        for ext in ("bin", "idx"):
            shutil.copyfile(f"{p.pt}.{ext}", os.path.join(p.tmp, f"cut{kind}_text_document.{ext}"))
        path = os.path.join(p.tmp, f"cut{kind}_text_document.{kind}")
        os.truncate(path, os.path.getsize(path) // 2)


def out_of_vocab_dataset(p: Paths):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(os.path.join(p.tmp, "oov_text_document.bin"), dtype=np.int32)
    rng = np.random.default_rng(0)
    for i in range(8):
        doc = rng.integers(0, 4000, 200).astype(np.int32)
        if i >= 2:
            doc[5::10] = 9999  # the tiny vocabulary has 4096 ids; every 33-token sample of these documents has one
        builder.add_document(doc, [len(doc)])
    builder.finalize(os.path.join(p.tmp, "oov_text_document.idx"))


def truncated_safetensors(p: Paths):
    shutil.copytree(p.hf, os.path.join(p.tmp, "hf"))
    path = os.path.join(p.tmp, "hf", "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 1000)


def wrong_shard_index(p: Paths):
    from safetensors.torch import save_file

    from ckpt_convert.hf_io import copy_side_files, read_all

    out = os.path.join(p.tmp, "hf")
    os.makedirs(out)
    tensors = read_all(p.hf)
    names = sorted(tensors)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, part in half.items():
        save_file({n: tensors[n] for n in part}, os.path.join(out, fname))
        weight_map.update({n: fname for n in part})
    weight_map["model.norm.weight"] = "model-00001-of-00002.safetensors"  # really in the second shard
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
    shutil.copy(os.path.join(p.hf, "config.json"), out)
    copy_side_files(p.hf, out)


def out_of_vocab_tokens(p: Paths):
    json.dump([[1, 99999, 3], [4, 5, 6]], open(os.path.join(p.tmp, "tokens.json"), "w"))


def _edit_rank_file(src: str, dst: str, edit):
    shutil.copytree(src, dst)
    edit_rank_file(os.path.join(dst, "iter_0000001", "mp_rank_00", "model_optim_rng.pt"), edit)


LORA_MODULE = "decoder.layers.0.self_attention.linear_proj"


def adapter_checkpoints(p: Paths):
    """adapter: what --lora-ckpt-filter saves (LoRA keys only, lora_only recorded); rank4: a base with rank-4
    adapters in it."""
    def adapters(rank, w):
        return {f"{LORA_MODULE}.lora_A.weight": torch.zeros(rank, w.shape[1]),
                f"{LORA_MODULE}.lora_B.weight": torch.zeros(w.shape[0], rank)}

    def only(state):
        state["model"] = adapters(4, state["model"][LORA_MODULE + ".weight"])
        state["lora_only"] = True

    def rank4(state):
        state["model"].update(adapters(4, state["model"][LORA_MODULE + ".weight"]))

    _edit_rank_file(p.mcore, os.path.join(p.tmp, "adapter"), only)
    _edit_rank_file(p.mcore, os.path.join(p.tmp, "rank4"), rank4)


def existing_outputs(p: Paths):
    """What a new write must not destroy: a trained checkpoint, an earlier HF export, a dataset; and a rank file
    with one flipped byte (same size)."""
    shutil.copytree(p.mcore, os.path.join(p.tmp, "ckpt"))
    shutil.copytree(p.hf, os.path.join(p.tmp, "export"))
    for ext in ("bin", "idx"):
        shutil.copyfile(f"{p.pt}.{ext}", os.path.join(p.tmp, f"ds_text_document.{ext}"))
    shutil.copytree(p.mcore, os.path.join(p.tmp, "flipped"))
    path = os.path.join(p.tmp, "flipped", "iter_0000001", "mp_rank_00", "model_optim_rng.pt")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    open(os.path.join(p.tmp, "empty.jsonl"), "w").close()


# ------------------------------------------------------------------------------------------------ the table
ROWS = [
    # issue 18 items 1-4: a write into a directory that holds something is refused before anything is written
    Row("hf2mcore_into_a_checkpoint",
        (*CONVERT, "hf2mcore", "--load-dir", "{hf}", "--save-dir", "{tmp}/ckpt", "--no-progress"),
        2, (r"--save-dir {tmp}/ckpt already holds .*--overwrite",), setup=existing_outputs),
    Row("mcore2hf_into_an_export",
        (*CONVERT, "mcore2hf", "--load-dir", "{mcore}", "--save-dir", "{tmp}/export", "--no-progress"),
        2, (r"--save-dir {tmp}/export already holds weight files \(model.safetensors.*--overwrite",),
        setup=existing_outputs),
    Row("train_save_into_another_run",
        (*PRETRAIN, *TRAIN_BASE, "--data-path", "{pt}", "--save", "{tmp}/ckpt"),
        1, (r"--save {tmp}/ckpt already holds checkpoints .*--overwrite",), setup=existing_outputs),
    Row("preprocess_over_a_dataset",
        (*PREPROCESS, "--input", "assets/data/pretrain_pydoc.jsonl", "--output-prefix", "{tmp}/ds",
         "--tokenizer-name-or-path", "{tok}", "--no-progress"),
        1, (r"--output-prefix {tmp}/ds: 2 output file\(s\) exist .*--overwrite",), setup=existing_outputs),
    # item 5: a flipped byte (same size) is named by the checksum record
    Row("mcore2hf_flipped_byte",
        (*CONVERT, "mcore2hf", "--load-dir", "{tmp}/flipped", "--save-dir", "{tmp}/out", "--no-progress"),
        2, (r"{tmp}/flipped/iter_0000001/mp_rank_00/model_optim_rng.pt: sha256 .*--no-verify-checksums",),
        setup=existing_outputs),
    # items 7, 9, 10: contradictory dtypes, an empty input file, a typo in --map-keys
    Row("hf2mcore_contradictory_dtypes",
        (*CONVERT, "hf2mcore", "--load-dir", "{hf}", "--save-dir", "{tmp}/out", "--bf16", "--fp16", "--no-progress"),
        2, (r"contradictory dtype flags --bf16 and --fp16",)),
    Row("preprocess_empty_input",
        (*PREPROCESS, "--input", "{tmp}/empty.jsonl", "--output-prefix", "{tmp}/e", "--tokenizer-name-or-path",
         "{tok}", "--no-progress"),
        1, (r"--input {tmp}/empty.jsonl: empty input file \(no records\)",), setup=existing_outputs),
    Row("preprocess_map_keys_typo",
        (*PREPROCESS, "--input", "assets/data/alpaca_builtins.jsonl", "--output-prefix", "{tmp}/m",
         "--tokenizer-name-or-path", "{tok}", "--handler-name", "AlpacaStyleInstructionHandler", "--map-keys",
         '{"instrucion": "instruction"}', "--no-progress"),
        1, (r"--map-keys: unknown field\(s\) 'instrucion' for --handler-name AlpacaStyleInstructionHandler; valid "
            r"fields: instruction, input, output",)),
    # item 6: --seq-length other than the one the instruction data was packed to
    Row("train_seq_length_differs_from_data",
        (*POSTTRAIN, "--model-config", TOK, "--seq-length", "256", "--train-iters", "2", "--micro-batch-size", "1",
         "--data-path", "{sft}"),
        2, (r"--seq-length 256 differs from the seq_length 128 the data was",)),

    # issue 18 item 11: a tokenizer directory that does not exist
    Row("preprocess_tokenizer_missing",
        (*PREPROCESS, "--input", "assets/data/pretrain_pydoc.jsonl", "--output-prefix", "{tmp}/x",
         "--tokenizer-name-or-path", "{tmp}/no_such_tok", "--no-progress"),
        1, (r"--tokenizer-name-or-path {tmp}/no_such_tok: the tokenizer directory does not exist",)),
    Row("train_tokenizer_missing",
        (*POSTTRAIN, *TRAIN_BASE, "--data-path", "{sft}", "--tokenizer-name-or-path", "{tmp}/no_such_tok"),
        2, (r"posttrain_gpt.py: error: --tokenizer-name-or-path {tmp}/no_such_tok: .*does not exist",)),
    # item 19: a truncated tokenizer.json
    Row("preprocess_tokenizer_truncated",
        (*PREPROCESS, "--input", "assets/data/pretrain_pydoc.jsonl", "--output-prefix", "{tmp}/x",
         "--tokenizer-name-or-path", "{tmp}/tok", "--no-progress"),
        1, (r"{tmp}/tok/tokenizer.json: not valid JSON .*truncated",), setup=truncated_tokenizer),
    Row("train_tokenizer_truncated",
        (*POSTTRAIN, *TRAIN_BASE, "--data-path", "{sft}", "--tokenizer-name-or-path", "{tmp}/tok"),
        2, (r"{tmp}/tok/tokenizer.json: not valid JSON",), setup=truncated_tokenizer),
    # item 12: truncated .bin / .idx, found when the dataset opens (before the model is built)
    Row("train_bin_truncated", (*PRETRAIN, *TRAIN_BASE, "--data-path", "{tmp}/cutbin_text_document"),
        2, (r"{tmp}/cutbin_text_document.bin: truncated \(\d+ bytes; .*needs \d+\)",), setup=truncated_datasets),
    Row("train_idx_truncated", (*PRETRAIN, *TRAIN_BASE, "--data-path", "{tmp}/cutidx_text_document"),
        2, (r"{tmp}/cutidx_text_document.idx: truncated",), setup=truncated_datasets),
    Row("train_data_missing", (*PRETRAIN, *TRAIN_BASE, "--data-path", "{tmp}/nothing"),
        2, (r"--data-path {tmp}/nothing: {tmp}/nothing.bin/.idx not found",)),
    # item 12: a truncated .safetensors
    Row("hf2mcore_safetensors_truncated",
        (*CONVERT, "hf2mcore", "--load-dir", "{tmp}/hf", "--save-dir", "{tmp}/out", "--no-progress"),
        2, (r"{tmp}/hf/model.safetensors: cannot be read as safetensors .*truncated",), setup=truncated_safetensors),
    # item 19: an index that maps a tensor to the wrong shard
    Row("hf2mcore_index_wrong_shard",
        (*CONVERT, "hf2mcore", "--load-dir", "{tmp}/hf", "--save-dir", "{tmp}/out", "--no-progress"),
        2, (r"model.safetensors.index.json: 1 tensor\(s\) mapped to the wrong shard: model.norm.weight -> "
            r"model-00001-of-00002.safetensors, which does not hold it \(it is in model-00002-of-00002",),
        setup=wrong_shard_index),
    # item 13: verify with a token id >= the vocabulary
    Row("verify_token_out_of_vocab",
        (*CONVERT, "verify", "--hf-dir", "{hf}", "--mcore-dir", "{mcore}", "--tokens-file", "{tmp}/tokens.json"),
        2, (r"--tokens-file {tmp}/tokens.json: token id 99999 at row 0, position 1 is outside the vocabulary "
            r"\[0, 4096\)",), setup=out_of_vocab_tokens),
    # item 14: an adapter-only checkpoint given as the base
    Row("mcore2hf_adapter_only_as_base",
        (*CONVERT, "mcore2hf", "--load-dir", "{tmp}/adapter", "--save-dir", "{tmp}/out", "--no-progress"),
        2, (r"--load-dir {tmp}/adapter: adapter-only checkpoint \(lora_only recorded\): pass the base checkpoint "
            r"as --load-dir and this one as --lora-load",), setup=adapter_checkpoints),
    Row("train_adapter_only_as_base",
        (*POSTTRAIN, "--load", "{tmp}/adapter", "--data-path", "{sft}", "--seq-length", "128", "--train-iters", "1",
         "--finetune"),
        1, (r"adapter-only checkpoint \(lora_only recorded.*\): pass the base checkpoint as --load and this one as "
            r"--lora-load",), setup=adapter_checkpoints),
    Row("train_load_not_a_checkpoint",
        (*POSTTRAIN, "--load", "{hf}", "--data-path", "{sft}", "--seq-length", "128", "--train-iters", "1"),
        2, (r"--load {hf}: no latest_checkpointed_iteration.txt / layout.json: not a Megatron checkpoint",)),
    # item 16: the LoRA merge's rank mismatch names the tensor and --lora-r
    Row("mcore2hf_lora_rank_mismatch",
        (*CONVERT, "mcore2hf", "--load-dir", "{tmp}/rank4", "--save-dir", "{tmp}/out", "--lora-r", "8",
         "--lora-alpha", "16", "--no-progress"),
        2, (rf"{LORA_MODULE}.lora_A.weight has LoRA rank 4 .* but --lora-r is 8; pass --lora-r 4",),
        setup=adapter_checkpoints),
    # item 15: pretraining on instruction data and the other way round
    Row("pretrain_on_instruction_data", (*PRETRAIN, *TRAIN_BASE, "--data-path", "{sft}"),
        2, (r"--data-path {sft}: this is instruction data .*fine-tune it with posttrain_gpt.py",)),
    Row("posttrain_on_pretraining_data", (*POSTTRAIN, *TRAIN_BASE, "--data-path", "{pt}"),
        2, (r"--data-path {pt}: this is pretraining data",)),
    # item 16: flags out of range, refused with the other flag checks
    Row("train_iters_zero_and_negative_lr",
        (*PRETRAIN, *TRAIN_BASE, "--data-path", "{pt}", "--train-iters", "0", "--lr=-1e-4"),
        2, (r"--train-iters must be > 0, got 0", r"--lr must be >= 0, got -0.0001")),
    # item 17: argparse errors are one line, no usage block
    Row("train_unknown_flag", (*PRETRAIN, *TRAIN_BASE, "--data-path", "{pt}", "--lr-decay-styel", "cosine"),
        2, (r"pretrain_gpt.py: error: unrecognized arguments: --lr-decay-styel",)),
    # item 17: a 2-rank script run: the trainer's checks run once before torchrun, one line, no torchrun report
    Row("script_flag_error_before_torchrun",
        ("bash", "examples/mcore/deepseek3/pretrain_deepseek3_tiny_cpu.sh", "--lr=-1"),
        2, (r"pretrain_gpt.py: error: --lr must be >= 0, got -1.0",),
        env={"DATA_PATH": "{pt}", "CKPT_SAVE_DIR": "{tmp}/ckpt", "NPROC_PER_NODE": "2", "LAYOUT": "tiny_cpu"}),
    # item 19: token ids >= the vocabulary inside a dataset (found at the first batch, named with the file)
    Row("train_dataset_token_out_of_vocab",
        (*PRETRAIN, "--model-config", TOK, "--seq-length", "32", "--train-iters", "1", "--micro-batch-size", "8",
         "--data-path", "{tmp}/oov_text_document", "--no-shuffle"),
        2, (r"{tmp}/oov_text_document.bin: token id 9999 \(sequence 2, position 5\) is >= the model's vocabulary "
            r"size 4096",), setup=out_of_vocab_dataset),
]


@pytest.fixture(scope="module")
def base_paths(tiny_data, tiny_hf_dir, tmp_path_factory):  # noqa: F811 - the imported session fixtures
    mcore = hf2mcore(tiny_hf_dir, str(tmp_path_factory.mktemp("sweep") / "mcore"))
    return dict(hf=tiny_hf_dir, mcore=mcore, sft=tiny_data["sft"], pt=tiny_data["pretrain"], tok=TOK)


_SETUPS: dict = {}


def _paths(base: dict, setup, factory) -> Paths:
    if setup not in _SETUPS:
        tmp = str(factory.mktemp(getattr(setup, "__name__", "none")))
        paths = Paths(tmp=tmp, **base)
        if setup is not None:
            setup(paths)
        _SETUPS[setup] = paths
    return _SETUPS[setup]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row, base_paths, tmp_path_factory):
    paths = _paths(base_paths, row.setup, tmp_path_factory)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               MINDSPEED_DSV_DEVICE="cpu", PYTHONPATH=ROOT)
    env.update({k: paths.fill(v) for k, v in row.env.items()})
    proc = subprocess.run([paths.fill(a) for a in row.argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == row.code, f"exit {proc.returncode}, want {row.code}:\n{out}"
    for pattern in row.patterns:
        assert re.search(paths.fill(pattern, escape=True), out), f"{pattern!r} not in:\n{out}"
    for pattern in row.absent:
        assert not re.search(pattern, out), f"{pattern!r} in:\n{out}"
    errors = [line for line in out.splitlines() if re.search(r"\berror: ", line)]
    assert len(errors) == 1, f"want exactly one error line, got {len(errors)}:\n{out}"
