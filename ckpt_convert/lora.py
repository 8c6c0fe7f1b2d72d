"""LoRA on the way to HF: merge adapters into base weights, or export them alone in PEFT format.

Adapter checkpoints use the base checkpoint's rank layout with keys `<base module path>.lora_A.weight` /
`.lora_B.weight` (mindspeed_dsv.peft.lora). A follows the base's input split and B its output split
(names.lora_splits), so each rank's adapter merges into that rank's shard: W_k + s * B_k @ A (column) or
W_k + s * B @ A_k (row), which is exactly the corresponding slice of W + s * B @ A.

The scale s = alpha / r comes from the training checkpoint itself (`args.lora_r`, `args.lora_alpha` and
`args.lora_target_modules` of its rank files, `lora_settings`): a flag may repeat a recorded value but not
contradict it, so a merge cannot silently use another scale than training did.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from ckpt_convert.mcore_io import load_rank_file, rank_file, read_iteration
from mindspeed_dsv.files import fsync_path, write_json_atomic
from mindspeed_dsv.layout import ParallelLayout
from mindspeed_dsv.models import family
from mindspeed_dsv.models import names as nm
from mindspeed_dsv.peft.lora import merge_lora

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def recorded_lora(ckpt_dir: str) -> dict:
    """`lora_r`, `lora_alpha`, `lora_target_modules` as training recorded them in `args` of the checkpoint's
    first rank file; a value is None where the file records none (a converted base, or a hand-made file)."""
    layout = ParallelLayout.load(ckpt_dir)
    # Only the saved args are read here (mmap, no tensor data): the weights are checked against their checksums
    # where they are read (McoreReader), which --no-verify-checksums can turn off.
    state = load_rank_file(rank_file(ckpt_dir, layout, 0, 0, 0, read_iteration(ckpt_dir)), verify=False)
    args = state.get("args")
    r = getattr(args, "lora_r", None) or None  # training's 0 means "no LoRA"
    targets = getattr(args, "lora_target_modules", None) if r else None
    return {"lora_r": r, "lora_alpha": getattr(args, "lora_alpha", None) if r else None,
            "lora_target_modules": sorted(targets) if targets else None}


def lora_settings(ckpt_dir: str, lora_r: int | None, lora_alpha: float | None,
                  target_modules: list[str] | None, subset_ok: bool = False) -> tuple[int, float, list[str] | None]:
    """(r, alpha, target modules) for merging or exporting the adapters of `ckpt_dir`: the recorded values,
    with the flags filling what is not recorded. A flag that contradicts a recorded value is refused, naming
    both. `subset_ok`: --lora-target-modules may name part of the recorded modules (PEFT export selects)."""
    rec = recorded_lora(ckpt_dir)
    given = {"lora_r": lora_r, "lora_alpha": lora_alpha,
             "lora_target_modules": sorted(set(target_modules)) if target_modules else None}
    for key, value in given.items():
        have = rec[key]
        if value is None or have is None:
            continue
        if key == "lora_target_modules":
            extra = sorted(set(value) - set(have))
            if extra or (value != have and not subset_ok):
                raise ValueError(f"--lora-target-modules {' '.join(value)} conflicts with the modules training "
                                 f"adapted, recorded in {ckpt_dir}: {' '.join(have)}"
                                 + (f" (not trained: {' '.join(extra)})" if extra else ""))
        elif float(value) != float(have):
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} {value} conflicts with {key} {have} recorded by training in {ckpt_dir}; "
                             f"drop the flag (the recorded value is used) or give {have}")
    r = rec["lora_r"] if rec["lora_r"] is not None else lora_r
    alpha = rec["lora_alpha"] if rec["lora_alpha"] is not None else lora_alpha
    if r is None or alpha is None:
        missing = [f for f, v in (("--lora-r", r), ("--lora-alpha", alpha)) if v is None]
        raise ValueError(f"{ckpt_dir} records no LoRA settings (no args.lora_r/lora_alpha in its rank files); "
                         f"give {' and '.join(missing)}")
    targets = given["lora_target_modules"] or rec["lora_target_modules"]
    return int(r), float(alpha), targets


def merge_lora_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, r: int) -> torch.Tensor:
    return merge_lora(w, a, b, alpha, r)


def export_peft(reader, cfg: dict, layout: ParallelLayout, save_dir: str, lora_r: int, lora_alpha: float,
                target_modules: list[str] | None, base_model: str | None = None) -> dict:
    """Write adapter_config.json + adapter_model.safetensors with peft's key names for transformers' model
    (`base_model.model.model.layers.N.self_attn.q_b_proj.lora_A.weight`; DeepSeek-V4: transformers' spelling
    whatever spelling the base was converted from, since peft loads onto transformers' module names).
    `reader` is a McoreReader on the adapter-only checkpoint (its rank files hold only lora_A/lora_B keys)."""
    if layout.moe_grouped_gemm:
        raise ValueError("--save-lora-to-hf cannot be used with --moe-grouped-gemm (grouped experts carry no "
                         "per-expert LoRA modules); train LoRA without --moe-grouped-gemm")
    if reader._mm_split:
        raise ValueError("--save-lora-to-hf cannot be used with --mla-mm-split (the split up-projections have "
                         "separate adapters that PEFT's q_b_proj/kv_b_proj cannot hold)")
    v4 = family.family_of(cfg) == family.DEEPSEEK4
    out: dict[str, torch.Tensor] = {}
    leaves: set[str] = set()
    done: set[tuple] = set()
    for tp, pp, ep in _ranks(layout):
        for c in range(layout.num_model_chunks):
            ck = nm.chunk_key(layout, c)
            for m in family.rank_maps(cfg, layout, tp, pp, ep, c, False):
                if m.lora_module is None or (m.hf, ck, pp) in done:
                    continue
                leaf = m.lora_module.rsplit(".", 1)[-1]
                if target_modules and leaf not in target_modules:
                    continue
                sd = reader._chunk(reader.dir, tp, pp, ep, ck)
                a_key, b_key = m.lora_module + ".lora_A.weight", m.lora_module + ".lora_B.weight"
                if a_key not in sd:
                    continue
                if v4 and m.expert is not None:
                    raise ValueError(
                        f"--save-lora-to-hf: {m.lora_module} adapts a DeepSeek-V4 routed expert; transformers holds "
                        "the routed experts as fused tensors (mlp.experts.gate_up_proj/down_proj) that peft cannot "
                        "adapt per expert. Merge these adapters with --lora-load instead, or export the attention "
                        "adapters alone (--lora-target-modules linear_q_down_proj linear_q_up_proj linear_kv_proj "
                        "linear_proj)")
                done.add((m.hf, ck, pp))
                a_split, b_split = nm.lora_splits(m.split)
                ranks = range(m.tp) if m.tp > 1 else [m.tp_rank]
                a_shards, b_shards = [], []
                for k in ranks:
                    sdk = reader._chunk(reader.dir, k if m.tp > 1 else tp, pp, ep, ck)
                    if a_key not in sdk or b_key not in sdk:
                        raise ValueError(f"LoRA {m.lora_module}: lora_A/lora_B missing on tp rank {k}")
                    a_shards.append(sdk[a_key])
                    b_shards.append(sdk[b_key])
                a = _full(a_split, a_shards)
                b_parts = _full_glu(b_shards) if b_split == nm.GLU else [_full(b_split, b_shards)]
                for hf_name, b in zip(m.hf, b_parts):
                    mod = nm.hf_module(hf_name)
                    out[f"base_model.model.{mod}.lora_A.weight"] = a.clone().contiguous()
                    out[f"base_model.model.{mod}.lora_B.weight"] = b.contiguous()
                    leaves.add(mod)
    # Full module paths, not leaf names: peft matches them exactly (a leaf like 'gate_proj' would also pull in
    # transformers' fused routed-expert parameters through peft's MoE conversion).
    if not out:
        raise ValueError(f"{reader.dir}: no LoRA weights (keys '*.lora_A.weight') found for target modules "
                         f"{target_modules or 'any'}")
    os.makedirs(save_dir, exist_ok=True)
    tmp = os.path.join(save_dir, PEFT_WEIGHTS + ".tmp")
    save_file(out, tmp, metadata={"format": "pt"})
    fsync_path(tmp)
    os.replace(tmp, os.path.join(save_dir, PEFT_WEIGHTS))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_r, "lora_alpha": lora_alpha,
        "lora_dropout": 0.0, "bias": "none", "target_modules": sorted(leaves), "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": base_model, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None,
    }
    write_json_atomic(os.path.join(save_dir, PEFT_CONFIG), config)
    return {"tensors": len(out), "modules": len(leaves)}


def _ranks(layout):
    from ckpt_convert.mcore_io import all_ranks

    return all_ranks(layout)


def _full(split: str, shards: list[torch.Tensor]) -> torch.Tensor:
    if split == nm.REPLICATED or len(shards) == 1:
        return shards[0]
    return torch.cat(shards, dim=0 if split == nm.COLUMN else 1)


def _full_glu(shards: list[torch.Tensor]) -> list[torch.Tensor]:
    halves = [s.chunk(2, dim=0) for s in shards]
    return [torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)]
