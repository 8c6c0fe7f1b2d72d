"""Build the tiny real dataset (assets/data/) and the tiny DeepSeek-V3 tokenizer (assets/tiny_deepseek3/).

Everything comes from text that ships with CPython itself, so nothing is downloaded:

* ``pydoc_data.topics`` — the Python Language Reference topics that ``help()`` shows (~460 KB of English),
* docstrings of the ``builtins`` functions, of ``str`` / ``list`` / ``dict`` / ``set`` / ``bytes`` methods and
  of a fixed list of standard-library modules.

Outputs (byte-for-byte reproducible with the same CPython version; the committed files were made with 3.11.7)::

    assets/data/pretrain_pydoc.jsonl          {"text": ...}           pretrain corpus
    assets/data/alpaca_builtins.jsonl         Alpaca   (instruction/input/output/system/history)
    assets/data/sharegpt_methods.jsonl        ShareGPT (conversations from/value, system, tools)
    assets/data/openai_topics.jsonl           OpenAI messages (system/user/assistant/tool,
                                              reasoning_content, per-turn loss)
    assets/tiny_deepseek3/tokenizer.json      byte-level BPE, 4096 ids in total
    assets/tiny_deepseek3/tokenizer_config.json   special tokens + DeepSeek-V3/R1 style chat template
    assets/tiny_deepseek3/special_tokens_map.json

The SFT sets are made to be learnable by a ~2M parameter model in minutes: short questions with short,
deterministic answers (the first sentence of a real docstring, or the heading of a reference topic).

Usage::

    python scripts/build_tiny_tokenizer.py            # data and tokenizer
    python scripts/build_tiny_tokenizer.py --skip-data  # tokenizer only, from the committed corpus
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import inspect
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, "assets", "data")
TOK_DIR = os.path.join(REPO, "assets", "tiny_deepseek3")

VOCAB_SIZE = 4096  # must equal assets/tiny_deepseek3/config.json vocab_size

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
# Added after the BPE vocabulary, at the top of the id range (as in the real DeepSeek-V3 tokenizer).
# (token, special): ``<think>``/``</think>`` are plain added tokens in DeepSeek-R1, so decode keeps them.
EXTRA_TOKENS = [
    ("<｜User｜>", True),
    ("<｜Assistant｜>", True),
    ("<think>", False),
    ("</think>", False),
    ("<｜tool▁calls▁begin｜>", True),
    ("<｜tool▁calls▁end｜>", True),
    ("<｜tool▁call▁begin｜>", True),
    ("<｜tool▁call▁end｜>", True),
    ("<｜tool▁outputs▁begin｜>", True),
    ("<｜tool▁outputs▁end｜>", True),
    ("<｜tool▁output▁begin｜>", True),
    ("<｜tool▁output▁end｜>", True),
    ("<｜tool▁sep｜>", True),
    ("<｜fim▁hole｜>", True),
    ("<｜fim▁begin｜>", True),
    ("<｜fim▁end｜>", True),
]

STDLIB_MODULES = [
    "abc", "argparse", "base64", "bisect", "collections", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob", "hashlib", "heapq", "hmac",
    "html", "inspect", "io", "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "shlex", "shutil", "socket", "statistics", "string", "struct",
    "subprocess", "tempfile", "textwrap", "threading", "time", "typing", "unittest", "urllib.parse",
    "uuid", "weakref", "zipfile", "zlib",
]

# DeepSeek-V3/R1 style chat template. Layout (all literal, no separators besides those shown):
#   BOS + system prompts joined by "\n\n" [+ tool list]
#   "<｜User｜>" + user content
#   "<｜Assistant｜>" + ["<think>\n" + reasoning_content + "\n</think>\n\n"] + content
#       [+ "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>"...
#          + "<｜tool▁calls▁end｜>"] + EOS
#   tool results: "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>" + content + "<｜tool▁output▁end｜>" (later
#       ones prefixed by "\n"), closed by "<｜tool▁outputs▁end｜>" which also replaces "<｜Assistant｜>" for the
#       assistant turn that follows (as in DeepSeek-V3's own template).
# Unlike DeepSeek-R1's inference template, ``reasoning_content`` is rendered (training data needs it).
# mindspeed_dsv/data/templates.py renders the same layout segment by segment; tests/data checks they agree.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system_prompt='', is_first_sp=true, is_tool=false, is_first_output=true) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if ns.is_first_sp -%}{%- set ns.system_prompt = message['content'] -%}{%- set ns.is_first_sp = false -%}"
    "{%- else -%}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if tools is defined and tools -%}"
    "{%- if ns.system_prompt -%}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' -%}{%- endif -%}"
    "{%- set ns.system_prompt = ns.system_prompt + '## Tools\\nYou can call these functions:' -%}"
    "{%- for tool in tools -%}{%- set ns.system_prompt = ns.system_prompt + '\\n' + (tool | tojson) -%}{%- endfor -%}"
    "{%- endif -%}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set ns.is_tool = false -%}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if ns.is_tool -%}{{ '<｜tool▁outputs▁end｜>' }}{%- set ns.is_tool = false -%}"
    "{%- else -%}{{ '<｜Assistant｜>' }}{%- endif -%}"
    "{%- if message.get('reasoning_content') -%}"
    "{{ '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- if message.get('content') -%}{{ message['content'] }}{%- endif -%}"
    "{%- if message.get('tool_calls') -%}"
    "{{ '<｜tool▁calls▁begin｜>' }}"
    "{%- for tool in message['tool_calls'] -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- set args = tool['function']['arguments'] -%}"
    "{%- if args is not string -%}{%- set args = args | tojson -%}{%- endif -%}"
    "{{ '<｜tool▁call▁begin｜>' + tool.get('type', 'function') + '<｜tool▁sep｜>' + tool['function']['name']"
    " + '\\n```json\\n' + args + '\\n```<｜tool▁call▁end｜>' }}"
    "{%- endfor -%}"
    "{{ '<｜tool▁calls▁end｜>' }}"
    "{%- endif -%}"
    "{{ '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if not ns.is_tool -%}{{ '<｜tool▁outputs▁begin｜>' }}{%- set ns.is_tool = true -%}"
    "{%- else -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.is_tool -%}{{ '<｜tool▁outputs▁end｜>' }}"
    "{%- elif add_generation_prompt -%}{{ '<｜Assistant｜>' }}{%- endif -%}"
)


# --------------------------------------------------------------------------------------------- text helpers
def _first_sentence(doc: str) -> str | None:
    """First prose sentence of a docstring, skipping signature lines such as ``abs(x, /)``."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", doc or "") if p.strip()]
    for p in paras:
        line = " ".join(p.split())
        if re.match(r"^[\w.]+\(.*\)( -> .*)?$", line) or line.startswith(("S.", "B.", "D.", "L.")) and "->" in line:
            continue  # a signature, not prose
        m = re.match(r"^(.+?[.!?])(\s|$)", line)
        sent = m.group(1) if m else line
        if 12 <= len(sent) <= 160:
            return sent
        return None
    return None


def _pretrain_docs() -> list[str]:
    import pydoc_data.topics as topics

    docs = []
    for key in sorted(topics.topics):
        text = topics.topics[key].strip()
        # split long topics at section underlines into documents of a few KB
        parts, cur = [], []
        for para in re.split(r"\n\s*\n", text):
            cur.append(para)
            if sum(len(p) for p in cur) > 3000:
                parts.append("\n\n".join(cur))
                cur = []
        if cur:
            parts.append("\n\n".join(cur))
        docs.extend(parts)
    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        if mod.__doc__:
            docs.append(f"Module {name}\n\n{inspect.cleandoc(mod.__doc__)}")
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)) and obj.__doc__:
                if getattr(obj, "__module__", name) not in (name, "_" + name, None) and not inspect.isbuiltin(obj):
                    continue
                doc = inspect.cleandoc(obj.__doc__)
                if len(doc) > 80:
                    docs.append(f"{name}.{attr}\n\n{doc}")
    return docs


def _builtin_pairs() -> list[tuple[str, str]]:
    out = []
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or not callable(obj) or (inspect.isclass(obj) and issubclass(obj, BaseException)):
            continue
        sent = _first_sentence(obj.__doc__)
        if sent:
            out.append((name, sent))
    return out


def _method_pairs() -> list[tuple[str, str]]:
    out = []
    for typ in (str, list, dict, set, bytes):
        for name in sorted(vars(typ)):
            if name.startswith("_"):
                continue
            sent = _first_sentence(getattr(typ, name).__doc__)
            if sent:
                out.append((f"{typ.__name__}.{name}", sent))
    return out


def _topic_pairs() -> list[tuple[str, str, str]]:
    import pydoc_data.topics as topics

    out = []
    for key in sorted(topics.topics):
        lines = topics.topics[key].strip().splitlines()
        title = lines[0].strip()
        if len(lines) > 1 and set(lines[1].strip()) <= {"*", "="} and 3 <= len(title) <= 80:
            body = " ".join(" ".join(l.split()) for l in lines[2:] if l.strip())
            first = _first_sentence(body) or ""
            out.append((key, title, first))
    return out


# --------------------------------------------------------------------------------------------- SFT builders
SYSTEM = "You are a concise assistant for the Python language."


def _alpaca(pairs):
    rows = []
    for i, (name, sent) in enumerate(pairs):
        if i % 3 == 1:
            row = {"instruction": "Explain this Python built-in in one sentence.", "input": name, "output": sent}
        else:
            row = {"instruction": f"What does the Python built-in `{name}` do?", "input": "", "output": sent}
        if i % 4 == 0:
            row["system"] = SYSTEM
        if i % 5 == 2 and i > 0:
            prev_name, prev_sent = pairs[i - 1]
            row["history"] = [[f"What does the Python built-in `{prev_name}` do?", prev_sent]]
        rows.append(row)
    return rows


LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_doc",
        "description": "Return the first sentence of the docstring of a Python object.",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    },
}


def _sharegpt(pairs):
    rows = []
    for i, (name, sent) in enumerate(pairs):
        conv = [{"from": "human", "value": f"What does `{name}` do?"}, {"from": "gpt", "value": sent}]
        row = {"conversations": conv}
        if i % 3 == 0:
            row["system"] = SYSTEM
        if i % 4 == 1 and i + 1 < len(pairs):
            nxt, nsent = pairs[i + 1]
            conv += [{"from": "human", "value": f"And `{nxt}`?"}, {"from": "gpt", "value": nsent}]
        if i % 7 == 3:
            row["conversations"] = [
                {"from": "human", "value": f"Look up `{name}` for me."},
                {"from": "function_call", "value": json.dumps({"name": "lookup_doc", "arguments": {"name": name}})},
                {"from": "observation", "value": sent},
                {"from": "gpt", "value": f"`{name}`: {sent}"},
            ]
            row["tools"] = json.dumps([LOOKUP_TOOL])
        rows.append(row)
    return rows


def _openai(topics):
    rows = []
    for i, (key, title, first) in enumerate(topics):
        q = f"What is the heading of the Python reference topic `{key}`?"
        msgs = []
        if i % 2 == 0:
            msgs.append({"role": "system", "content": SYSTEM})
        if i % 5 == 1 and i > 0:
            pkey, ptitle, _ = topics[i - 1]
            # an earlier turn kept as context only: no loss on it
            msgs += [
                {"role": "user", "content": f"What is the heading of the Python reference topic `{pkey}`?"},
                {"role": "assistant", "content": ptitle, "loss": False},
            ]
        msgs.append({"role": "user", "content": q})
        if i % 3 == 0:
            msgs.append({"role": "assistant", "reasoning_content": f"The topic key is `{key}`; its heading is "
                         "the first line of the page.", "content": title})
        elif i % 7 == 2 and first:
            msgs += [
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                    "name": "lookup_topic", "arguments": json.dumps({"key": key})}}]},
                {"role": "tool", "content": title},
                {"role": "assistant", "content": title},
            ]
        else:
            msgs.append({"role": "assistant", "content": title})
        rows.append({"messages": msgs})
    return rows


def _write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}: {len(rows)} rows, {os.path.getsize(path) / 1024:.0f} KB")


def build_data():
    os.makedirs(DATA_DIR, exist_ok=True)
    _write_jsonl(os.path.join(DATA_DIR, "pretrain_pydoc.jsonl"), [{"text": t} for t in _pretrain_docs()])
    _write_jsonl(os.path.join(DATA_DIR, "alpaca_builtins.jsonl"), _alpaca(_builtin_pairs()))
    _write_jsonl(os.path.join(DATA_DIR, "sharegpt_methods.jsonl"), _sharegpt(_method_pairs()))
    _write_jsonl(os.path.join(DATA_DIR, "openai_topics.jsonl"), _openai(_topic_pairs()))


# --------------------------------------------------------------------------------------------- tokenizer
def _training_texts():
    for name in sorted(os.listdir(DATA_DIR)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(DATA_DIR, name), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                # every string in the row, so SFT wording is in the vocabulary too
                stack = [row]
                while stack:
                    x = stack.pop()
                    if isinstance(x, str):
                        yield x
                    elif isinstance(x, dict):
                        stack.extend(x[k] for k in sorted(x, reverse=True))
                    elif isinstance(x, list):
                        stack.extend(reversed(x))


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(EXTRA_TOKENS),
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    base = tok.get_vocab_size()
    assert base == VOCAB_SIZE - len(EXTRA_TOKENS), f"BPE learnt {base} ids; corpus too small for the target"
    tok.add_special_tokens([AddedToken(t, special=s, normalized=False) for t, s in EXTRA_TOKENS])
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]
    # DeepSeek-V3's tokenizer prepends BOS on plain encode (add_bos_token=true, add_eos_token=false).
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]),
    ])
    os.makedirs(TOK_DIR, exist_ok=True)
    path = os.path.join(TOK_DIR, "tokenizer.json")
    tok.save(path + ".tmp", pretty=False)
    os.replace(path + ".tmp", path)

    added = {}
    for i, t in enumerate([BOS, EOS, PAD]):
        added[str(i)] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
    for t, s in EXTRA_TOKENS:
        added[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": s}
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    for name, obj in (("tokenizer_config.json", cfg),
                      ("special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})):
        p = os.path.join(TOK_DIR, name)
        with open(p + ".tmp", "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(p + ".tmp", p)
    print(f"wrote {TOK_DIR}: vocab {tok.get_vocab_size()} ({base} BPE incl. 3 specials + {len(EXTRA_TOKENS)} added)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-data", action="store_true", help="reuse the committed assets/data/*.jsonl")
    p.add_argument("--skip-tokenizer", action="store_true", help="only rebuild assets/data/")
    args = p.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print(f"note: committed assets were built with CPython 3.11; this is {sys.version.split()[0]}")
    if not args.skip_data:
        build_data()
    if not args.skip_tokenizer:
        build_tokenizer()


if __name__ == "__main__":
    main()
