"""Shared fixtures for checkpoint tests: a tiny random HF DeepSeek-V3 directory made by transformers."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ckpt_convert.hf_io import copy_side_files, read_all

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "assets", "tiny_deepseek3")


def make_hf_dir(path: str, mtp: bool = True, seed: int = 0, config_overrides: dict | None = None) -> str:
    """DeepseekV3ForCausalLM(config).save_pretrained(path) with random weights (every tensor, norms and the
    expert bias included, made non-trivial), plus MTP layer tensors `model.layers.{N}.*` when mtp=True, added
    the way the official checkpoint stores them (embed_tokens / shared_head.head equal to the main ones)."""
    from transformers import AutoConfig, DeepseekV3ForCausalLM

    cfg = AutoConfig.from_pretrained(TINY)
    for k, v in (config_overrides or {}).items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name else 0.0))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn_like(b) * 0.01)
    model.save_pretrained(path)
    copy_side_files(TINY, path)
    if mtp:
        add_mtp(path, seed)
    return path


def add_mtp(path: str, seed: int = 0) -> None:
    """Write the MTP layer (index num_hidden_layers) into its own shard and rewrite an index."""
    cfg = json.load(open(os.path.join(path, "config.json")))
    n, H = cfg["num_hidden_layers"], cfg["hidden_size"]
    base = read_all(path)
    g = torch.Generator().manual_seed(seed + 100)
    mtp = {}
    last = f"model.layers.{n - 1}."
    for k, v in base.items():
        if k.startswith(last):
            mtp[f"model.layers.{n}." + k[len(last):]] = torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype) * 0.05
    p = f"model.layers.{n}."
    mtp[p + "enorm.weight"] = torch.rand(H, generator=g) + 0.5
    mtp[p + "hnorm.weight"] = torch.rand(H, generator=g) + 0.5
    mtp[p + "eh_proj.weight"] = torch.randn(H, 2 * H, generator=g) * 0.05
    mtp[p + "shared_head.norm.weight"] = torch.rand(H, generator=g) + 0.5
    mtp[p + "embed_tokens.weight"] = base["model.embed_tokens.weight"].clone()
    mtp[p + "shared_head.head.weight"] = base["lm_head.weight"].clone()
    save_file(mtp, os.path.join(path, "model-mtp.safetensors"), metadata={"format": "pt"})
    os.replace(os.path.join(path, "model.safetensors"), os.path.join(path, "model-main.safetensors"))
    wm = {k: "model-main.safetensors" for k in base}
    wm.update({k: "model-mtp.safetensors" for k in mtp})
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(path, "model.safetensors.index.json"), "w"))


def edit_rank_file(path: str, edit) -> None:
    """Load a rank file, apply `edit(state)`, save it and re-record its checksum (see rerecord_checksum)."""
    state = torch.load(path, weights_only=False)
    edit(state)
    torch.save(state, path)
    rerecord_checksum(path)


def rerecord_checksum(path: str) -> None:
    """Record a rank file's new sha256 in its iteration's checksums.json: a deliberate change, not corruption (tests
    of what the loaded values do must get past checksum verification)."""
    from mindspeed_dsv.files import sha256_file
    from mindspeed_dsv.rankfiles import CHECKSUMS

    iter_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    record = os.path.join(iter_dir, CHECKSUMS)
    if os.path.isfile(record):
        rec = json.load(open(record))
        rec["sha256"][os.path.relpath(path, iter_dir).replace(os.sep, "/")] = sha256_file(path)
        json.dump(rec, open(record, "w"))
