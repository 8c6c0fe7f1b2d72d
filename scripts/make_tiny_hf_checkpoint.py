"""Write a seeded, randomly initialised HF DeepSeek-V3 (or V4) checkpoint of a (tiny) config.

    python scripts/make_tiny_hf_checkpoint.py --save-dir work_dirs/tiny_hf [--mtp] [--seed 1234]

The model is transformers' ``DeepseekV3ForCausalLM(config)`` saved with ``save_pretrained`` (so the files are
exactly what transformers reads back), plus the tokenizer files found next to the config. With ``--mtp`` the
multi-token-prediction layer is added the way DeepSeek's official checkpoint stores it: HF layer index
``num_hidden_layers`` (``model.layers.{N}.*``) holding a full decoder layer and ``enorm``, ``hnorm``,
``eh_proj``, ``shared_head.norm``, plus copies of the embedding and output head
(``embed_tokens``, ``shared_head.head``). transformers ignores those keys on load; ``ckpt_convert hf2mcore``
converts them into Megatron's ``mtp.layers.0.*``. Without ``--mtp`` the written config.json says
``num_nextn_predict_layers: 0``, so the config never promises MTP weights the checkpoint does not hold.

The output is written to a temporary directory next to ``--save-dir`` and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from ckpt_convert.hf_io import copy_side_files, read_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "assets", "tiny_deepseek3")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write a seeded random-init HF DeepseekV3ForCausalLM checkpoint (safetensors + config + "
                    "tokenizer), optionally with the MTP layer in DeepSeek's official naming.")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="config.json, or a directory holding it (and the tokenizer files to copy). "
                        "Default: assets/tiny_deepseek3.")
    p.add_argument("--save-dir", required=True, help="Output HF directory.")
    p.add_argument("--seed", type=int, default=1234, help="torch seed of the random init. Default 1234.")
    p.add_argument("--mtp", action="store_true",
                   help="Add the MTP layer(s) model.layers.{N..N+k-1}.* (k = num_nextn_predict_layers of the "
                        "config) so hf2mcore converts MTP. Default off: no MTP tensors, and config.json is written with "
                        "num_nextn_predict_layers 0 to say so.")
    p.add_argument("--tokenizer-dir", default=None,
                   help="Copy tokenizer files from here. Default: the --config directory.")
    p.add_argument("--overwrite", action="store_true", help="Replace --save-dir if it exists.")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="Override the config's vocab_size (DeepSeek-V4's tiny config has 256 ids; the tiny V4 "
                        "tokenizer has 4096). Default: the config's.")
    return p


def _config_path(path: str) -> str:
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def mtp_tensors(config, main: dict, seed: int) -> dict:
    """The official MTP tensors for k = num_nextn_predict_layers modules, initialised like transformers does
    (normal(0, initializer_range) linears, unit norms, zero expert bias). The decoder layer of each module is
    the last layer of a seeded (N+k)-layer model, saved by transformers itself, so its keys and shapes are
    exactly those of a DeepSeek-V3 MoE layer."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    n = config.num_hidden_layers
    k = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    if k < 1:
        raise SystemExit(f"--mtp: num_nextn_predict_layers is {k} in the config; nothing to add")
    big_cfg = config.__class__.from_dict(config.to_dict())
    big_cfg.num_hidden_layers = n + k
    torch.manual_seed(seed + 1)
    big = DeepseekV3ForCausalLM(big_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        big.save_pretrained(tmp)
        tensors = read_all(tmp)
    out = {key: t for key, t in tensors.items()
           if any(key.startswith(f"model.layers.{n + j}.") for j in range(k))}
    h = config.hidden_size
    std = float(getattr(config, "initializer_range", 0.02))
    g = torch.Generator().manual_seed(seed + 2)
    dtype = main["model.embed_tokens.weight"].dtype
    for j in range(k):
        p = f"model.layers.{n + j}."
        out[p + "enorm.weight"] = torch.ones(h, dtype=dtype)
        out[p + "hnorm.weight"] = torch.ones(h, dtype=dtype)
        out[p + "eh_proj.weight"] = (torch.randn(h, 2 * h, generator=g) * std).to(dtype)
        out[p + "shared_head.norm.weight"] = torch.ones(h, dtype=dtype)
        # The official checkpoint stores its own copies of the embedding and head; they equal the main ones.
        out[p + "embed_tokens.weight"] = main["model.embed_tokens.weight"].clone()
        out[p + "shared_head.head.weight"] = main["lm_head.weight"].clone()
    return out


def _randomize_v4_tables(model, config) -> None:
    """transformers initialises DeepSeek-V4's hash-routing table (tid2eid) to zeros, a table naming expert 0 k
    times, which the converter refuses: give every token k distinct random experts instead (seeded)."""
    import torch

    for name, buf in model.named_buffers():
        if name.endswith("tid2eid"):
            rows = torch.rand(buf.shape[0], config.n_routed_experts).argsort(dim=-1)[:, : buf.shape[1]]
            buf.copy_(rows.to(buf.dtype))


def write_checkpoint(config_path: str, save_dir: str, seed: int, mtp: bool, tokenizer_dir: str | None,
                     vocab_size: int | None = None) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, DeepseekV3ForCausalLM, DeepseekV4ForCausalLM

    config = AutoConfig.from_pretrained(os.path.dirname(config_path))
    if config.model_type not in ("deepseek_v3", "deepseek_v4"):
        raise SystemExit(f"{config_path}: model_type {config.model_type!r}, expected 'deepseek_v3' or 'deepseek_v4'")
    v4 = config.model_type == "deepseek_v4"
    if v4 and mtp:
        # transformers drops V4's MTP module; its checkpoint spelling comes with the V4 MTP work.
        raise SystemExit("--mtp: DeepSeek-V4 MTP weights are not written yet; make the V4 checkpoint without --mtp")
    if vocab_size is not None:
        config.vocab_size = vocab_size
    if not mtp:
        # The config must describe the weights: a config promising MTP layers that are absent makes hf2mcore
        # convert without MTP while the trainer's default (from config.json) asks for them.
        config.num_nextn_predict_layers = 0
    torch.manual_seed(seed)
    model = (DeepseekV4ForCausalLM if v4 else DeepseekV3ForCausalLM)(config)
    if v4:
        _randomize_v4_tables(model, config)

    parent = os.path.dirname(os.path.abspath(save_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(save_dir) + ".partial-", dir=parent)
    try:
        if v4:
            # transformers' save_pretrained of V4 writes a third spelling (official names under `model.`, e.g.
            # model.layers.0.attn.wq_a.weight) that ckpt_convert does not read; its own module names (what
            # from_pretrained loads as is, and mcore2hf writes for a transformers-spelled source) are written here.
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            model.save_pretrained(tmp)
        main = read_all(tmp)
        summary = {"main_tensors": len(main), "params": sum(t.numel() for t in main.values()), "mtp_tensors": 0}
        if mtp:
            extra = mtp_tensors(config, main, seed)
            save_file(extra, os.path.join(tmp, "model-mtp.safetensors"), metadata={"format": "pt"})
            # A single-file save has no index; write one that names both files.
            shards = [f for f in os.listdir(tmp) if f.endswith(".safetensors") and f != "model-mtp.safetensors"]
            index_path = os.path.join(tmp, "model.safetensors.index.json")
            if os.path.isfile(index_path):
                with open(index_path) as f:
                    index = json.load(f)
            else:
                if len(shards) != 1:
                    raise SystemExit(f"unexpected shard files {shards} without an index")
                index = {"metadata": {}, "weight_map": {key: shards[0] for key in main}}
            index["weight_map"].update({key: "model-mtp.safetensors" for key in extra})
            with open(index_path, "w") as f:
                json.dump(index, f, indent=2)
            summary["mtp_tensors"] = len(extra)
        src = tokenizer_dir or os.path.dirname(config_path)
        summary["tokenizer_files"] = copy_side_files(src, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if os.path.exists(save_dir):
            shutil.rmtree(save_dir)
        os.replace(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_path = _config_path(args.config)
    if not os.path.isfile(config_path):
        print(f"make_tiny_hf_checkpoint: error: --config: {config_path} does not exist", file=sys.stderr)
        return 2
    if os.path.exists(args.save_dir) and not args.overwrite:
        print(f"make_tiny_hf_checkpoint: error: --save-dir {args.save_dir} exists (pass --overwrite)", file=sys.stderr)
        return 2
    s = write_checkpoint(config_path, args.save_dir, args.seed, args.mtp, args.tokenizer_dir, args.vocab_size)
    if not s["tokenizer_files"]:
        print("make_tiny_hf_checkpoint: warning: no tokenizer files copied", file=sys.stderr)
    print(f"wrote {args.save_dir}: {s['main_tensors']} tensors ({s['params']:,} parameters), "
          f"{s['mtp_tensors']} MTP tensors, tokenizer files {s['tokenizer_files']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
