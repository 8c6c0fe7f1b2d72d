"""Load an HF checkpoint with transformers and greedy-generate answers to prompts taken from a training file.

    python scripts/generate_check.py --hf-dir work_dirs/quickstart/hf_out \
        --data assets/data/alpaca_builtins.jsonl --num-prompts 4

The prompts are rendered with the tokenizer's own chat template (``apply_chat_template`` with
``add_generation_prompt``), i.e. the way a user of the exported checkpoint would query it, and the model is
``AutoModelForCausalLM.from_pretrained`` — nothing of this repository is involved, so this is an independent
check that the exported files are a working DeepSeek-V3 checkpoint. For held-in prompts (taken from the
fine-tuning data) a model that learned its data reproduces the reference answer; the script prints both and
how many characters of the reference the generation reproduces.

Records: Alpaca (``instruction``/``input``/``output``/``system``), OpenAI (``messages``) or ShareGPT
(``conversations``); multi-turn records contribute their first turn only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Greedy generation from an HF checkpoint on prompts from a JSONL file.")
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json, safetensors, tokenizer).")
    p.add_argument("--data", required=True, help="JSONL file (Alpaca, OpenAI messages or ShareGPT records).")
    p.add_argument("--num-prompts", type=int, default=4, help="Prompts to run (the first N usable records). Default 4.")
    p.add_argument("--skip", type=int, default=0, help="Skip the first N usable records. Default 0.")
    p.add_argument("--max-new-tokens", type=int, default=48, help="Tokens generated per prompt. Default 48.")
    p.add_argument("--min-match", type=float, default=None,
                   help="Exit 1 unless the mean fraction of the reference reproduced (common prefix / reference "
                        "length) reaches this. Default: report only.")
    return p


def first_turn(row: dict) -> tuple[list[dict], str] | None:
    """(messages up to the first assistant turn, reference answer) or None if the record has no such turn."""
    if "instruction" in row:
        prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
        msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        if row.get("history"):  # earlier turns come first; keep them so the prompt is the trained one
            for q, a in row["history"]:
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": prompt}], row.get("output", "")
    if "messages" in row:
        msgs = []
        for m in row["messages"]:
            if m["role"] == "assistant":
                return msgs, m.get("content") or ""
            msgs.append({"role": m["role"], "content": m["content"]})
        return None
    if "conversations" in row:
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        for m in row["conversations"]:
            role = roles.get(m["from"], m["from"])
            if role == "assistant":
                return msgs, m["value"]
            msgs.append({"role": role, "content": m["value"]})
    return None


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for path, what in ((args.hf_dir, "--hf-dir"), (args.data, "--data")):
        if not os.path.exists(path):
            print(f"generate_check: error: {what} {path} does not exist", file=sys.stderr)
            return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # The official MTP layer (model.layers.{N}.*) is not part of DeepseekV3ForCausalLM: its keys are reported
    # as unexpected on load, which is correct and not worth a page of output.
    hf_logging.set_verbosity_error()

    tok = AutoTokenizer.from_pretrained(args.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    model.eval()

    items = []
    with open(args.data, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            turn = first_turn(json.loads(line))
            if turn and turn[1]:
                items.append(turn)
    items = items[args.skip: args.skip + args.num_prompts]
    if not items:
        print(f"generate_check: error: no usable records in {args.data}", file=sys.stderr)
        return 2

    scores = []
    for i, (msgs, reference) in enumerate(items):
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        score = common_prefix(answer.strip(), reference.strip()) / max(1, len(reference.strip()))
        scores.append(score)
        print(f"[{i}] prompt   : {msgs[-1]['content']!r}")
        print(f"    expected : {reference!r}")
        print(f"    generated: {answer!r}   ({score:.0%} of the reference reproduced)")
    mean = sum(scores) / len(scores)
    print(f"mean reproduced: {mean:.0%} over {len(scores)} held-in prompts")
    if args.min_match is not None and mean < args.min_match:
        print(f"generate_check: mean {mean:.2f} < --min-match {args.min_match}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
