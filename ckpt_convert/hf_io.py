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

import glob
import json
import os
import re
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckpt_convert.fp8 import BLOCK, dequantize_block_fp8, quantize_block_fp8

INDEX = "model.safetensors.index.json"
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")


class HFCheckpointError(ValueError):
    pass


class HFReader:
    def __init__(self, directory: str, fp8_dtype: torch.dtype = torch.bfloat16):
        self.dir = directory
        self.fp8_dtype = fp8_dtype
        self.file_of: dict[str, str] = {}
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise HFCheckpointError(f"{index}: not a safetensors index ({e})") from None
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
        self.used: set[str] = set()

    # ------------------------------------------------------------------ raw access
    def _handle(self, name: str):
        path = self.file_of[name]
        h = self._handles.get(path)
        if h is None:
            if len(self._handles) > 16:
                self._handles.clear()
            h = self._handles[path] = open_shard(path)
        return h

    def _raw_shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def _raw_dtype(self, name: str) -> str:
        return self._handle(name).get_slice(name).get_dtype()

    def names(self) -> list[str]:
        """Every readable tensor name (per-expert names for fused experts; scales hidden)."""
        out = [n for n in self.file_of if not _FUSED.match(n) and not n.endswith("_scale_inv")]
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
        self.used.add(name)
        if name in self._virtual:
            fused, e, part = self._virtual[name]
            self.used.add(fused)
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
            self.used.add(scale_name)
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
    os.replace(tmp, path)
    return out


def write_index(directory: str, weight_map: dict[str, str], total_size: int) -> None:
    tmp = os.path.join(directory, INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, f,
                  indent=2)
    os.replace(tmp, os.path.join(directory, INDEX))


def copy_side_files(src: str, dst: str, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
    import shutil

    copied = []
    for n in names:
        p = os.path.join(src, n)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(dst, n))
            copied.append(n)
    return copied
