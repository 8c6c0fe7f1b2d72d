"""Convert JSONL / JSON / Parquet corpora into Megatron indexed datasets (``.bin`` + ``.idx``).

    python -m mindspeed_dsv.data.preprocess --input assets/data/pretrain_pydoc.jsonl \\
        --tokenizer-name-or-path assets/tiny_deepseek3 --output-prefix out/pydoc --append-eod --workers 2

Outputs (read with ``megatron.core.datasets.indexed_dataset.IndexedDataset(prefix)``):

* pretrain (``GeneralPretrainHandler``): ``{prefix}_{json_key}_document`` per ``--json-keys`` entry
  (default ``{prefix}_text_document``), one document per record, dtype uint16 when the vocabulary fits.
* instruction handlers: ``{prefix}_packed_input_ids_document``, ``{prefix}_packed_labels_document``
  (-100 where no loss) and ``{prefix}_packed_attention_mask_document`` (1-based sample index per token,
  0 = padding), int32, one row per sequence — see ``mindspeed_dsv.data.packing``.
* ``{prefix}_summary.json``: counts, tokens, throughput and every dropped record with its reason.

Files are written as ``*.tmp`` and renamed when complete, so a present ``.idx`` always means a whole dataset.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from mindspeed_dsv.data.checks import load_tokenizer
from mindspeed_dsv.data.readers import DataError, count_records, decode_line, iter_records, resolve_inputs

CHUNK_RECORDS = 512  # records per worker task: amortises IPC, still small enough for a smooth bar


@dataclass
class PreprocessConfig:
    input: str
    output_prefix: str
    tokenizer_name_or_path: str
    handler_name: str = "GeneralPretrainHandler"
    json_keys: List[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    prompt_type: str = "deepseek3"
    seq_length: Optional[int] = None
    pack: bool = False
    neat_pack: bool = False
    map_keys: Optional[Dict[str, str]] = None
    on_bad_sample: str = "fatal"
    log_interval: int = 100
    progress: bool = True
    overwrite: bool = False

    def validate(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if (self.pack or self.neat_pack) and not self.seq_length:
            raise ValueError("--pack / --neat-pack need --seq-length")
        if self.pack and self.neat_pack:
            raise ValueError("choose one of --pack and --neat-pack")
        if self.on_bad_sample not in ("skip", "fatal"):
            raise ValueError(f"--on-bad-sample must be skip or fatal, got {self.on_bad_sample!r}")


# ------------------------------------------------------------------------------------------------- workers
_STATE: Dict[str, Any] = {}


def _init_worker(cfg: PreprocessConfig, tokenizer_json: str, eod_id: Optional[int]) -> None:
    # One tokenizer thread per worker process: --workers is the parallelism knob (and the unit the benchmark
    # compares against the raw tokenizer).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    from mindspeed_dsv.data.handlers import get_handler

    try:
        _STATE["handler"] = get_handler(cfg.handler_name, Tokenizer.from_str(tokenizer_json), cfg.json_keys,
                                        cfg.append_eod, cfg.prompt_type, cfg.map_keys, eod_id)
    except Exception as e:  # raised from the first task instead: a failing Pool initializer would respawn forever
        _STATE["init_error"] = e


def _process_chunk(chunk: List[Tuple[str, Any]]) -> List[Tuple[str, Any]]:
    """Parse + tokenize one chunk; returns ``(where, result | DataError)`` in input order."""
    if "init_error" in _STATE:
        raise RuntimeError(f"worker start-up failed: {_STATE['init_error']!r}")
    parsed: List[Any] = []
    for where, payload in chunk:
        if isinstance(payload, bytes):
            try:
                payload = decode_line(where, payload)
            except DataError as e:
                payload = e
        elif not isinstance(payload, dict):
            payload = DataError(where, f"expected a JSON object, got {type(payload).__name__}")
        parsed.append(payload)
    good = [(w, p) for (w, _), p in zip(chunk, parsed) if not isinstance(p, DataError)]
    results = iter(_STATE["handler"].tokenize_batch(good))
    return [(w, p if isinstance(p, DataError) else next(results)) for (w, _), p in zip(chunk, parsed)]


# ------------------------------------------------------------------------------------------------- writers
class _Dataset:
    """One IndexedDataset written under a temporary name, renamed on ``commit``."""

    def __init__(self, prefix: str, dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.tmp_bin, self.tmp_idx = prefix + ".bin.tmp", prefix + ".idx.tmp"
        self.builder = IndexedDatasetBuilder(self.tmp_bin, dtype=dtype)

    def add(self, arr: np.ndarray) -> None:
        self.builder.add_document(arr, [len(arr)])

    def commit(self) -> None:
        self.builder.finalize(self.tmp_idx)
        os.replace(self.tmp_bin, self.prefix + ".bin")
        os.replace(self.tmp_idx, self.prefix + ".idx")  # .idx last: its presence means "complete"

    def abort(self) -> None:
        try:
            self.builder.data_file.close()
        except Exception:
            pass
        for p in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(p):
                os.remove(p)


def existing_outputs(cfg: PreprocessConfig) -> List[str]:
    """Files this config would write that already exist (refused unless --overwrite)."""
    paths = [p + ext for p in output_prefixes(cfg) for ext in (".bin", ".idx")] + [cfg.output_prefix + "_summary.json"]
    return [p for p in paths if os.path.exists(p)]


def output_prefixes(cfg: PreprocessConfig) -> List[str]:
    """The dataset prefixes ``preprocess`` writes for this config (without .bin/.idx)."""
    from mindspeed_dsv.data.handlers import HANDLERS

    if not HANDLERS[cfg.handler_name].is_instruction:
        return [f"{cfg.output_prefix}_{k}_document" for k in cfg.json_keys]
    return [f"{cfg.output_prefix}_packed_{k}_document" for k in ("input_ids", "labels", "attention_mask")]


# ------------------------------------------------------------------------------------------------- driver
def _chunks(files: List[str], cfg: PreprocessConfig, file_errors: List[DataError]) -> Iterator[list]:
    for path in files:
        chunk: List[Tuple[str, Any]] = []
        n = 0
        try:
            for rec in iter_records(path):
                n += 1
                chunk.append(rec)
                if len(chunk) == CHUNK_RECORDS:
                    yield chunk
                    chunk = []
        except DataError as e:  # the file as a whole cannot be read (e.g. a broken .json array)
            if cfg.on_bad_sample == "fatal":
                raise
            file_errors.append(e)
            n = -1  # reported as a dropped file, not as an empty one
        if n == 0:
            # An empty file would give an empty dataset that training cannot even open (numpy cannot mmap it).
            raise ValueError(f"--input {path}: empty input file (no records)")
        if chunk:
            yield chunk


def _reason(e: DataError) -> str:
    return e.reason.split(" (")[0]


def preprocess(cfg: PreprocessConfig) -> Dict[str, Any]:
    """Run the conversion; returns the summary (also written to ``{output_prefix}_summary.json``)."""
    from mindspeed_dsv.data.handlers import HANDLERS, IGNORE_INDEX
    from mindspeed_dsv.data.packing import Packer, neat_rows, rows_unpacked, truncate

    from mindspeed_dsv.data.handlers import check_map_keys

    cfg.validate()
    if cfg.handler_name not in HANDLERS:
        raise ValueError(f"--handler-name {cfg.handler_name!r} is not known (choices: {', '.join(HANDLERS)})")
    check_map_keys(cfg.handler_name, cfg.map_keys)
    existing = existing_outputs(cfg)
    if existing and not cfg.overwrite:
        raise ValueError(f"--output-prefix {cfg.output_prefix}: {len(existing)} output file(s) exist "
                         f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); pass --overwrite to "
                         "replace them, or choose another prefix")
    files = resolve_inputs(cfg.input)
    counts = [count_records(f) for f in files]
    total = None if any(c is None for c in counts) else sum(counts)

    tok = load_tokenizer(cfg.tokenizer_name_or_path)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{cfg.tokenizer_name_or_path}: a fast tokenizer (tokenizer.json) is required")
    tok_json, eod_id = tok.backend_tokenizer.to_str(), tok.eos_token_id
    instruction = HANDLERS[cfg.handler_name].is_instruction
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    # start the workers before the (slow) megatron import so both happen at once
    pool = None
    if cfg.workers > 1:
        pool = mp.get_context("spawn").Pool(cfg.workers, initializer=_init_worker, initargs=(cfg, tok_json, eod_id))

    from megatron.core.datasets.indexed_dataset import DType
    from tqdm import tqdm

    prefixes = output_prefixes(cfg)
    if instruction:
        writers = [_Dataset(p, np.int32) for p in prefixes]
    else:
        writers = [_Dataset(p, DType.optimal_dtype(len(tok))) for p in prefixes]

    stats = Counter()
    dropped: Counter = Counter()
    dropped_where: List[str] = []
    empty_where: List[str] = []  # instruction records whose response is empty (only end-of-sentence learnt)
    file_errors: List[DataError] = []
    packer = Packer(cfg.seq_length, pad_id) if (instruction and cfg.pack) else None
    held: List[Tuple[np.ndarray, np.ndarray]] = []  # --neat-pack needs every sample before binning

    def write_row(row):
        for w, arr in zip(writers, row):
            w.add(arr)
        stats["rows"] += 1

    def bad(e: DataError, bar):
        if cfg.on_bad_sample == "fatal":
            raise e
        dropped[_reason(e)] += 1
        dropped_where.append(str(e))
        bar.write(f"skipped {e}", file=sys.stderr)

    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="docs", dynamic_ncols=True, disable=not cfg.progress, mininterval=0.5)
    last_log = 0
    try:
        chunks = _chunks(files, cfg, file_errors)
        if pool is not None:
            results = pool.imap(_process_chunk, chunks)
        else:
            _init_worker(cfg, tok_json, eod_id)
            results = map(_process_chunk, chunks)
        for chunk in results:
            for where, res in chunk:
                stats["records"] += 1
                if isinstance(res, DataError):
                    bad(res, bar)
                    continue
                if not instruction:
                    for w, key in zip(writers, cfg.json_keys):
                        w.add(res[key])
                        stats["tokens"] += len(res[key])
                    stats["documents"] += 1
                    continue
                sample, cut = truncate(res, cfg.seq_length)
                if not (sample[1] != IGNORE_INDEX).any():
                    why = "no token carries loss" + (" after truncation to --seq-length" if cut else "")
                    bad(DataError(where, why), bar)
                    continue
                learnt = sample[1][sample[1] != IGNORE_INDEX]
                if eod_id is not None and (learnt == eod_id).all():
                    # kept (a model may have to learn to answer nothing), but counted and reported
                    empty_where.append(where)
                stats["truncated"] += cut
                stats["documents"] += 1
                stats["tokens"] += len(sample[0])
                stats["loss_tokens"] += int((sample[1] != IGNORE_INDEX).sum())
                if packer is not None:
                    for row in packer.add(sample):
                        write_row(row)
                elif cfg.neat_pack:
                    held.append(sample)
                else:
                    write_row(rows_unpacked(sample))
            bar.update(len(chunk))
            if stats["records"] // cfg.log_interval != last_log:
                last_log = stats["records"] // cfg.log_interval
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{stats['tokens'] / dt:,.0f} tokens/s", refresh=False)
        if packer is not None:
            for row in packer.finish():
                write_row(row)
        if held:
            for row in neat_rows(held, cfg.seq_length, pad_id):
                write_row(row)
        for e in file_errors:
            dropped[_reason(e) + " (whole file)"] += 1
            dropped_where.append(str(e))
        if stats["documents"] == 0:
            raise ValueError(f"--input {cfg.input}: no documents to write ({stats['records']} record(s), "
                             f"{sum(dropped.values())} dropped); an empty dataset cannot be trained on")
        for w in writers:
            w.commit()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    dt = time.perf_counter() - t0
    summary = {
        "handler": cfg.handler_name,
        "files": files,
        "records": stats["records"],
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "seconds": round(dt, 3),
        "documents_per_s": round(stats["documents"] / dt, 1),
        "tokens_per_s": round(stats["tokens"] / dt, 1),
        "dropped": dict(dropped),
        "dropped_records": dropped_where,
        "outputs": prefixes,
    }
    if instruction:
        summary.update(rows=stats["rows"], loss_tokens=stats["loss_tokens"], truncated=stats["truncated"],
                       empty_responses=len(empty_where), empty_response_records=empty_where,
                       seq_length=cfg.seq_length, packing="pack" if cfg.pack else "neat-pack" if cfg.neat_pack
                       else "none")
    path = cfg.output_prefix + "_summary.json"
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=2)
    os.replace(path + ".tmp", path)
    return summary


def print_summary(s: Dict[str, Any], file=None) -> None:
    file = file or sys.stdout
    print(f"done: {s['records']} records from {len(s['files'])} file(s) -> {s['documents']} documents, "
          f"{s['tokens']:,} tokens in {s['seconds']:.2f} s "
          f"({s['documents_per_s']:,.0f} docs/s, {s['tokens_per_s']:,.0f} tokens/s)", file=file)
    if "rows" in s:
        print(f"  rows written: {s['rows']} (packing: {s['packing']}, seq_length: {s['seq_length']}), "
              f"loss tokens: {s['loss_tokens']:,}, truncated samples: {s['truncated']}", file=file)
        if s.get("empty_responses"):
            print(f"  empty responses (only the end-of-sentence token is learnt): {s['empty_responses']}, "
                  f"first at {s['empty_response_records'][0]}", file=file)
    if s["dropped"]:
        print(f"  dropped {sum(s['dropped'].values())} record(s):", file=file)
        for why, n in sorted(s["dropped"].items()):
            print(f"    {n:6d}  {why}", file=file)
    else:
        print("  dropped: none", file=file)
    for p in s["outputs"]:
        print(f"  wrote {p}.bin / .idx", file=file)


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize JSONL/JSON/Parquet data into Megatron indexed datasets (.bin/.idx).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("input / output")
    g.add_argument("--input", required=True,
                   help="a .jsonl/.json/.parquet file, a glob, a directory of them, or several joined by commas")
    g.add_argument("--output-prefix", required=True,
                   help="path prefix of the outputs; dataset names are appended (e.g. PREFIX_text_document)")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="pretrain: the record keys to tokenize, one output dataset per key")
    g.add_argument("--map-keys", type=json.loads, default=None,
                   help='instruction handlers: JSON mapping of standard field names to the columns of your data, '
                        'e.g. \'{"instruction": "question", "output": "answer"}\'; fields: Alpaca instruction, '
                        'input, output, system, history; ShareGPT conversations, system, tools; OpenAI messages, '
                        'tools (an unknown field is an error)')
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-name-or-path", required=True,
                   help="local Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json)")
    g.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=["PretrainedFromHF"],
                   help="accepted for MindSpeed-LLM script compatibility; only HF tokenizers are supported")
    g.add_argument("--append-eod", action="store_true",
                   help="pretrain: append the end-of-document token (the tokenizer's EOS) to every document")
    g = p.add_argument_group("handler / template")
    g.add_argument("--handler-name", default="GeneralPretrainHandler",
                   choices=["GeneralPretrainHandler", "AlpacaStyleInstructionHandler",
                            "SharegptStyleInstructionHandler", "OpenAIStyleInstructionHandler"],
                   help="how a record is read: plain text, or one of the instruction formats")
    g.add_argument("--prompt-type", default="deepseek3", choices=["deepseek3", "deepseek4"],
                   help="chat template for instruction data: deepseek3 (DeepSeek-V3/R1 format) or deepseek4 (DeepSeek-V4 encoding)")
    g.add_argument("--seq-length", type=int, default=None,
                   help="instruction data: samples longer than this are truncated; row length for packing")
    g.add_argument("--pack", action="store_true",
                   help="concatenate samples into rows of exactly --seq-length; a sample may continue in the "
                        "next row; boundaries recorded in the attention_mask dataset")
    g.add_argument("--neat-pack", action="store_true",
                   help="pack whole samples into rows of --seq-length (no sample split), pad the rest")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--on-bad-sample", default="fatal", choices=["fatal", "skip"],
                   help="a malformed/non-UTF-8 line, missing key or empty conversation: stop with the file "
                        "and line (fatal), or report it, skip it and count it in the summary (skip)")
    g.add_argument("--log-interval", type=int, default=100,
                   help="refresh the throughput shown on the progress bar every N documents")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar (progress shown: %(default)s)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the dataset files of an existing --output-prefix (default: refuse to)")
    return p


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    d = vars(args).copy()
    d.pop("tokenizer_type", None)
    return PreprocessConfig(**d)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        summary = preprocess(cfg)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
