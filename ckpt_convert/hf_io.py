"""Reading and writing HF DeepSeek-V3 safetensors directories, tensor by tensor.

`HFReader` opens the shards lazily (safetensors `safe_open`) and returns one tensor, or only some rows or
columns of it, at a time. It accepts
  * `model.safetensors.index.json` + shards, a single `model.safetensors`, or any `*.safetensors` set;
  * per-expert keys (`mlp.experts.E.{gate,up,down}_proj.weight`, what transformers' save_pretrained and the
    official checkpoints write) and transformers' fused in-memory keys (`mlp.experts.gate_up_proj` [E, 2I, H],
    `mlp.experts.down_proj` [E, H, I]), presenting the latter under the per-expert names;
  * FP8 e4m3 weights with `<name>_scale_inv` block scales, dequantized on read (see fp8.py).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mindspeed_dsv.files import (crash_point, fsync_path, inside, is_empty_dir, replace_dir, sha256_file,
                                write_json_atomic)
from ckpt_convert.fp8 import BLOCK, dequantize_block_fp8, quantize_block_fp8
from mindspeed_dsv.rankfiles import TOKENIZER_FILES, copy_side_files  # noqa: F401 (re-exported)

INDEX = "model.safetensors.index.json"
_FUSED = re.compile(r"^(model\.(?:layers|mtp)\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")  # mtp: DeepSeek-V4


class HFCheckpointError(ValueError):
    pass


class HFReader:
    def __init__(self, directory: str, fp8_dtype: torch.dtype = torch.bfloat16, verify_checksums: bool = True):
        self.dir = directory
        self.fp8_dtype = fp8_dtype
        self.file_of: dict[str, str] = {}
        # shard path -> sha256 recorded in the index by our mcore2hf; checked when the shard is first opened
        self._sha256: dict[str, str] = {}
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    idx = json.load(f)
                    weight_map = idx["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise HFCheckpointError(f"{index}: not a safetensors index ({e})") from None
            if verify_checksums:
                recorded = (idx.get("metadata") or {}).get("sha256") or {}
                self._sha256 = {os.path.join(directory, k): v for k, v in recorded.items()}
            for name, file in weight_map.items():
                self.file_of[name] = os.path.join(directory, file)
            missing = sorted({p for p in self.file_of.values() if not os.path.isfile(p)})
            if missing:
                raise HFCheckpointError(f"{index}: shard file(s) listed in the index are missing: {missing[:3]}")
            _check_index(index, self.file_of)
        else:
            files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
            if not files:
                raise HFCheckpointError(f"{directory}: no {INDEX} and no *.safetensors files")
            for path in files:
                for name in shard_keys(path):
                    self.file_of[name] = path
        self._handles: dict[str, object] = {}
        # per-expert name -> (fused name, expert, row slice of the fused [E, 2I, H] / [E, H, I] tensor)
        self._virtual: dict[str, tuple[str, int, str]] = {}
        for name in list(self.file_of):
            m = _FUSED.match(name)
            if not m:
                continue
            shape = self._raw_shape(name)
            prefix, kind = m.groups()
            for e in range(shape[0]):
                if kind == "gate_up_proj":
                    self._virtual[f"{prefix}.{e}.gate_proj.weight"] = (name, e, "gate")
                    self._virtual[f"{prefix}.{e}.up_proj.weight"] = (name, e, "up")
                else:
                    self._virtual[f"{prefix}.{e}.down_proj.weight"] = (name, e, "down")

    # ------------------------------------------------------------------ raw access
    def _handle(self, name: str):
        path = self.file_of[name]
        h = self._handles.get(path)
        if h is None:
            want = self._sha256.pop(path, None)
            if want is not None and sha256_file(path) != want:
                raise HFCheckpointError(f"{path}: sha256 differs from the one recorded in {INDEX}: the shard is "
                                        "corrupt (flipped or changed bytes); pass --no-verify-checksums to read it anyway")
            if len(self._handles) > 16:
                self._handles.clear()
            h = self._handles[path] = open_shard(path)
        return h

    def _raw_shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def _raw_dtype(self, name: str) -> str:
        return self._handle(name).get_slice(name).get_dtype()

    def names(self) -> list[str]:
        """Every readable tensor name (per-expert names for fused experts; the FP8 scale of a stored tensor is
        part of that tensor and hidden, a scale without its tensor is listed)."""
        out = [n for n in self.file_of
               if not _FUSED.match(n) and not (n.endswith("_scale_inv") and n[: -len("_scale_inv")] in self.file_of)]
        return out + list(self._virtual)

    def __contains__(self, name: str) -> bool:
        return name in self._virtual or (name in self.file_of and not _FUSED.match(name))

    def is_fp8(self, name: str) -> bool:
        return name in self.file_of and self._raw_dtype(name).startswith("F8")

    def shape(self, name: str) -> list[int]:
        if name in self._virtual:
            fused, _, part = self._virtual[name]
            e, a, b = self._raw_shape(fused)
            return [a // 2, b] if part in ("gate", "up") else [a, b]
        if name not in self.file_of:
            raise HFCheckpointError(f"{self.dir}: tensor {name} is missing")
        return self._raw_shape(name)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Tensor `name`, or rows/cols of it (dim 0 / dim 1 slices), as a fresh CPU tensor."""
        rows = rows or slice(None)
        cols = cols or slice(None)
        if name in self._virtual:
            fused, e, part = self._virtual[name]
            shape = self._raw_shape(fused)
            if part in ("gate", "up"):
                half = shape[1] // 2
                base = 0 if part == "gate" else half
                r = range(half)[rows]
                return self._handle(fused).get_slice(fused)[e, base + r.start:base + r.stop, cols].contiguous()
            return self._handle(fused).get_slice(fused)[e, rows, cols].contiguous()
        if name not in self.file_of:
            raise HFCheckpointError(f"{self.dir}: tensor {name} is missing")
        h = self._handle(name)
        if self._raw_dtype(name).startswith("F8"):
            scale_name = name + "_scale_inv"
            if scale_name not in self.file_of:
                raise HFCheckpointError(f"{self.dir}: FP8 tensor {name} has no {scale_name}")
            q = h.get_tensor(name)
            s = self._handle(scale_name).get_tensor(scale_name)
            try:
                w = dequantize_block_fp8(q, s, self.fp8_dtype)
            except ValueError as e:
                raise HFCheckpointError(f"{self.dir}: {name}: {e}") from None
            return w[rows, cols].contiguous()
        sl = h.get_slice(name)
        if len(sl.get_shape()) == 1:
            return sl[rows].contiguous()
        return sl[rows, cols].contiguous()

    def close(self) -> None:
        self._handles.clear()


def open_shard(path: str):
    """safe_open, naming the file when its header or length is wrong (a truncated copy, most often)."""
    try:
        return safe_open(path, "pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError; re-raised naming the file
        raise HFCheckpointError(f"{path}: cannot be read as safetensors ({e}; {os.path.getsize(path)} bytes): the "
                                "file is truncated or corrupt; copy it again") from None


def shard_keys(path: str) -> list[str]:
    with open_shard(path) as f:
        return list(f.keys())


def _check_index(index: str, file_of: dict[str, str]) -> None:
    """Every tensor the index maps to a shard is in that shard (headers only), so a wrong index names the tensor
    and both files instead of failing deep in the conversion."""
    held = {path: set(shard_keys(path)) for path in sorted(set(file_of.values()))}
    wrong = [name for name, path in file_of.items() if name not in held[path]]
    if wrong:
        lines = []
        for name in wrong[:5]:
            really = [os.path.basename(p) for p, keys in held.items() if name in keys]
            lines.append(f"{name} -> {os.path.basename(file_of[name])}, which does not hold it "
                         f"({'it is in ' + ', '.join(really) if really else 'no shard holds it'})")
        raise HFCheckpointError(f"{index}: {len(wrong)} tensor(s) mapped to the wrong shard: " + "; ".join(lines))


def read_all(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of every `*.safetensors` file in `directory`, under its stored name (no fused-expert
    renaming, no FP8 dequantization: what is on disk). For small checkpoints: tests and the tiny-checkpoint script."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise HFCheckpointError(f"{directory}: the directory does not exist")
    if not os.path.isfile(path):
        raise HFCheckpointError(f"{directory}: no config.json")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise HFCheckpointError(f"{path}: not valid JSON ({e})") from None


def fp8_quantizable(name: str) -> bool:
    """Tensors the official FP8 checkpoint stores in e4m3: decoder linear weights (attention projections,
    dense/shared/routed expert MLPs). Embeddings, lm_head, norms, the router and the MTP eh_proj stay as is."""
    return bool(re.search(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|"
                          r"(gate|up|down)_proj)\.weight$", name))


def save_shard(tensors: dict[str, torch.Tensor], path: str, fp8: bool = False) -> dict[str, torch.Tensor]:
    """Write one safetensors shard through a temporary name; with fp8, quantize what the official checkpoint
    quantizes and add `<name>_scale_inv`. Returns what was written (name -> tensor)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if fp8 and fp8_quantizable(name) and t.dim() == 2:
            q, s = quantize_block_fp8(t, BLOCK)
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = t.contiguous()
    tmp = path + ".tmp"
    save_file(out, tmp, metadata={"format": "pt"})
    fsync_path(tmp)
    os.replace(tmp, path)
    return out


def write_index(directory: str, weight_map: dict[str, str], total_size: int,
                checksums: dict[str, str] | None = None) -> None:
    """The safetensors index; `checksums` (shard file -> sha256) go into its metadata, where transformers
    ignores them and HFReader verifies them."""
    meta = {"total_size": total_size}
    if checksums:
        meta["sha256"] = dict(sorted(checksums.items()))
    write_json_atomic(os.path.join(directory, INDEX), {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))})


# Files whose presence makes transformers (or our HFReader) read weights from a directory.
WEIGHT_FILE = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|\.index\.json$")


def check_save_dir(save_dir: str, load_dirs: Iterable[str], overwrite: bool) -> None:
    """Before anything is read or written: --save-dir is neither a source directory nor inside one, and holds no
    files unless --overwrite."""
    for d in load_dirs:
        if inside(save_dir, d):
            raise HFCheckpointError(f"--save-dir {save_dir} is (inside) the source checkpoint {d}: write the HF "
                                    "export to another directory")
    if not is_empty_dir(save_dir) and not overwrite:
        weights = sorted(n for n in os.listdir(save_dir) if WEIGHT_FILE.search(n))
        what = f"weight files ({', '.join(weights[:4])}{', ...' if len(weights) > 4 else ''})" if weights else "files"
        raise HFCheckpointError(f"--save-dir {save_dir} already holds {what}: choose an empty directory, or pass "
                                "--overwrite to replace the weights there (files that are not weights are kept)")


def _staging_name(save_dir: str) -> str:
    parent, base = os.path.split(os.path.abspath(save_dir))
    return os.path.join(parent, f".{base}.partial-")


@contextlib.contextmanager
def staged_dir(save_dir: str):
    """Yield an empty sibling directory to write a whole HF export into; on success publish it as `save_dir`.

    Publishing: every entry of the old `save_dir` that is not a weight file (WEIGHT_FILE) and that the export
    does not write is hard-linked (copied where links fail) into the new directory, the two directories are
    swapped atomically, and the old one is removed. A reader of `save_dir` therefore sees the old export or the
    new one, never old weight files beside new ones. A staging directory left by a killed run is removed here."""
    save_dir = os.path.realpath(save_dir)  # a symlinked --save-dir: replace the directory it points to
    prefix = _staging_name(save_dir)
    for stale in glob.glob(glob.escape(prefix) + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    stage = prefix + str(os.getpid())
    os.makedirs(stage)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    crash_point("hf_export:written")
    if os.path.isdir(save_dir):
        for name in os.listdir(save_dir):
            src, dst = os.path.join(save_dir, name), os.path.join(stage, name)
            if WEIGHT_FILE.search(name) or name.startswith(".partial-") or os.path.lexists(dst):
                continue
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, dst)
        shutil.copymode(save_dir, stage)
        if not os.listdir(save_dir):
            os.rmdir(save_dir)
    replace_dir(stage, save_dir)
    crash_point("hf_export:published")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
