"""verify: logits of the HF model (transformers) against the Megatron checkpoint loaded into our model.

Implemented for single-rank layouts (TP=PP=EP=1, no VPP) in one process; multi-rank layouts are refused with
a message (convert with `reshard` to TP1/PP1/EP1 first, which is bit-identical).
"""

from __future__ import annotations

import json
import os
import sys

import torch


def run_verify(ns) -> int:
    from transformers import AutoModelForCausalLM

    from ckpt_convert.mcore_io import load_rank_file, rank_file, read_iteration
    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.platform import init_distributed

    layout = ParallelLayout.load(ns.mcore_dir)
    if layout.tp * layout.pp * layout.ep != 1 or layout.num_model_chunks != 1:
        print(f"error: verify runs single-rank layouts only; {ns.mcore_dir} has TP={layout.tp} PP={layout.pp} "
              f"EP={layout.ep}. Run `python -m ckpt_convert reshard --load-dir {ns.mcore_dir} --save-dir TMP` "
              "(bit-identical) and verify TMP.", file=sys.stderr)
        return 2
    tokens = torch.tensor(json.load(open(ns.tokens_file)), dtype=torch.long)
    dtype = torch.bfloat16 if ns.dtype == "bf16" else torch.float32
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    init_distributed()
    cfg = DeepSeekConfig.from_hf(ns.mcore_dir)
    model = build_model(cfg, layout, params_dtype=dtype)
    state = load_rank_file(rank_file(ns.mcore_dir, layout, 0, 0, 0, read_iteration(ns.mcore_dir)))["model"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        print(f"error: checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
              file=sys.stderr)
        return 2
    model.eval()
    calls = []
    model.output_layer.register_forward_hook(lambda m, i, o: calls.append(o[0].transpose(0, 1).float().clone()))
    pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad():
        model(tokens, pos, attention_mask=None, labels=torch.roll(tokens, -1, dims=1))
        ours = calls[-1]  # the main head runs last (MTP heads call the output layer first)
        hf = AutoModelForCausalLM.from_pretrained(ns.hf_dir, dtype=dtype).eval()
        ref = hf(tokens).logits.float()
    diff = (ours - ref).abs()
    rel = (diff.norm() / ref.norm()).item()
    print(json.dumps({"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "relative": rel}))
    if ns.save_logits:
        torch.save(ours, ns.save_logits)
    return 0 if diff.max().item() <= ns.tolerance else 1
