"""Build the tiny DeepSeek-V4 tokenizer (assets/tiny_deepseek4/) from the tiny DeepSeek-V3 one.

The byte-level BPE of ``assets/tiny_deepseek3/tokenizer.json`` (made by scripts/build_tiny_tokenizer.py from
CPython's own text) is kept; the added tokens at the top of the id range (4080-4095) become DeepSeek-V4's:
``<｜User｜>``, ``<｜Assistant｜>``, ``<think>``, ``</think>``, ``｜DSML｜`` (tool-call markup), ``<｜latest_reminder｜>``,
the task tokens (``<｜action｜>`` ... ``<｜read_url｜>``), ``<｜deepseek_image｜>`` and the FIM tokens. BOS, EOS and
PAD keep ids 0, 1, 2 (config.json bos_token_id 0, eos_token_id 1, as the V4 release).

tokenizer_config.json carries a jinja chat template equal to the release's ``encode_messages`` in chat mode
for system / user / assistant messages (``--prompt-type deepseek4`` renders the same text; tests/data checks it),
so ``apply_chat_template`` (scripts/generate_check.py) prompts the model as training did.

    python scripts/make_tiny_deepseek4_tokenizer.py [--out assets/tiny_deepseek4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V3_DIR = os.path.join(REPO, "assets", "tiny_deepseek3")
OUT_DIR = os.path.join(REPO, "assets", "tiny_deepseek4")

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
FIRST_ADDED_ID = 4080
# (token, special). Tokens the model writes in answers (thinking, DSML tool calls) are not special, so
# decode(skip_special_tokens=True) keeps them.
V4_TOKENS = [
    ("<｜User｜>", True),
    ("<｜Assistant｜>", True),
    ("<think>", False),
    ("</think>", False),
    ("｜DSML｜", False),
    ("<｜latest_reminder｜>", True),
    ("<｜action｜>", True),
    ("<｜query｜>", True),
    ("<｜authority｜>", True),
    ("<｜domain｜>", True),
    ("<｜title｜>", True),
    ("<｜read_url｜>", True),
    ("<｜deepseek_image｜>", True),
    ("<｜fim▁hole｜>", True),
    ("<｜fim▁begin｜>", True),
    ("<｜fim▁end｜>", True),
]

# The release's encode_messages(thinking_mode="chat") for system / user / assistant: system text where it
# stands, consecutive user messages merged with "\n\n", "<｜Assistant｜></think>" after the user turn that an
# assistant turn (or the end of the conversation: the generation prompt) follows, EOS after each answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'user' %}<｜User｜>{% else %}{{ '\\n\\n' }}{% endif %}"
    "{{ m['content'] }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] == 'assistant' %}<｜Assistant｜></think>{% endif %}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% else %}{{ raise_exception('this template renders system, user and assistant messages only') }}"
    "{% endif %}"
    "{% endfor %}"
)


def _added(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def build(out_dir: str) -> None:
    with open(os.path.join(V3_DIR, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    keep = [a for a in tok["added_tokens"] if a["id"] < FIRST_ADDED_ID]
    if [a["content"] for a in keep] != [BOS, EOS, PAD]:
        raise SystemExit(f"{V3_DIR}/tokenizer.json: unexpected low added tokens {[a['content'] for a in keep]}")
    added = [_added(FIRST_ADDED_ID + i, t, s) for i, (t, s) in enumerate(V4_TOKENS)]
    tok["added_tokens"] = keep + added
    if FIRST_ADDED_ID + len(V4_TOKENS) != 4096 or len(tok["model"]["vocab"]) != FIRST_ADDED_ID:
        raise SystemExit("the tiny vocabulary must stay 4096 ids: 4080 BPE entries + 16 added tokens")
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "unk_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in a if k != "id"} for a in tok["added_tokens"]},
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    os.makedirs(out_dir, exist_ok=True)
    for name, obj in (("tokenizer.json", tok), ("tokenizer_config.json", config),
                      ("special_tokens_map.json", special_map)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2 if name != "tokenizer.json" else None)
            f.write("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the tiny DeepSeek-V4 tokenizer from the tiny DeepSeek-V3 one.")
    p.add_argument("--out", default=OUT_DIR, help="Output directory. Default assets/tiny_deepseek4.")
    args = p.parse_args(argv)
    build(args.out)
    print(f"wrote tokenizer.json, tokenizer_config.json, special_tokens_map.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
