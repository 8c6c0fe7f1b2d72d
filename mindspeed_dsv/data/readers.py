"""Find input files and read them as numbered records, without losing track of where each came from.

A record is ``(where, payload)``: ``where`` is ``"path, line N"`` (JSONL) or ``"path, record N"`` (JSON array,
Parquet row), and ``payload`` is either raw bytes (a JSONL line, decoded and parsed later in a worker so the
main process stays cheap) or an already-parsed dict.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator, List, Tuple, Union

SUFFIXES = (".jsonl", ".json", ".parquet")

Payload = Union[bytes, dict]


class DataError(ValueError):
    """Bad input; the message starts with the file and line (or record) it came from."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def resolve_inputs(spec: str) -> List[str]:
    """``spec`` is a file, a glob, a directory (its .jsonl/.json/.parquet files), or several joined by commas."""
    files: List[str] = []
    for part in [p for p in spec.split(",") if p]:
        if os.path.isdir(part):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(part)
                for f in names
                if f.endswith(SUFFIXES)
            )
        elif any(c in part for c in "*?["):
            found = sorted(f for f in glob.glob(part, recursive=True) if f.endswith(SUFFIXES))
        elif os.path.isfile(part):
            found = [part]
        else:
            raise FileNotFoundError(f"--input {part!r}: no such file, directory or glob match")
        if not found:
            raise FileNotFoundError(f"--input {part!r}: no .jsonl/.json/.parquet files found")
        files.extend(found)
    for f in files:
        if not f.endswith(SUFFIXES):
            raise ValueError(f"--input {f!r}: unsupported file type (expected {', '.join(SUFFIXES)})")
    return files


def count_records(path: str) -> int | None:
    """Cheap record count for the progress bar (None where it would mean parsing the file twice)."""
    if path.endswith(".jsonl"):
        n = 0
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                n += block.count(b"\n")
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                n += f.read(1) != b"\n"
        return n
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


def decode_line(where: str, raw: bytes) -> dict:
    """Decode and parse one JSONL line; raise DataError naming ``where`` on any problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(where, f"not valid UTF-8 (byte {e.start} of the line: {raw[e.start:e.start + 4]!r})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(where, f"malformed JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        raise DataError(where, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_records(path: str) -> Iterator[Tuple[str, Payload]]:
    """Yield ``(where, payload)`` for every record of one file, in file order. Blank JSONL lines are skipped
    (they are not records); everything else is yielded, valid or not, so the caller can report it."""
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    yield f"{path}, line {lineno}", raw
    elif path.endswith(".json"):
        yield from _iter_json(path)
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        n = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield f"{path}, record {n}", row
    else:
        raise ValueError(f"{path}: unsupported file type")


def _iter_json(path: str) -> Iterator[Tuple[str, Payload]]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line}", "not valid UTF-8; a .json file must be valid as a whole")
    stripped = text.lstrip()
    if not stripped.startswith("["):
        # many ".json" files in the wild are really JSON Lines
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield f"{path}, line {lineno}", line.encode("utf-8")
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}", f"malformed JSON ({e.msg} at column {e.colno})")
    for i, row in enumerate(rows, 1):
        yield f"{path}, record {i}", row
