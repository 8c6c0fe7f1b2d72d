"""The flag tables of docs/{en,zh}/flags.md, generated from the parsers the code uses.

    python -m tests.examples.flag_tables --write     # regenerate both pages' tables
    python -m tests.examples.flag_tables --check     # exit 1 if a page is out of date

Each table is written between `<!-- flags:NAME:begin -->` and `<!-- flags:NAME:end -->` markers; the prose
around them is hand-written. tests/examples/test_docs_flags.py checks that every flag each parser accepts
appears in both languages' tables.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# Training flags whose value is fixed by the checkpoint or by another step of the pipeline.
_SHARD = {"--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--expert-model-parallel-size",
          "--num-layers-per-virtual-pipeline-stage", "--num-layer-list", "--noop-layers", "--schedules-method",
          "--num-layers", "--mtp-num-layers", "--first-k-dense-replace", "--num-experts", "--moe-grouped-gemm",
          "--make-vocab-size-divisible-by",
          "--moe-tp-extend-ep", "--target-tensor-parallel-size", "--target-pipeline-parallel-size",
          "--target-expert-parallel-size", "--source-tensor-parallel-size", "--source-pipeline-parallel-size",
          "--source-expert-parallel-size", "--mla-mm-split", "--target-num-layers-per-virtual-pipeline-stage",
          "--target-num-layer-list", "--target-noop-layers", "--target-schedules-method", "--target-num-layers"}
_LORA = {"--lora-r", "--lora-alpha", "--lora-target-modules"}
_CONFIG = {"--hidden-size", "--num-attention-heads", "--ffn-hidden-size", "--moe-ffn-hidden-size", "--moe-router-topk",
           "--q-lora-rank", "--kv-lora-rank", "--qk-head-dim", "--qk-pos-emb-head-dim", "--v-head-dim", "--vocab-size"}

MATCH = {
    "en": {"shard": "yes (conversion ⇄ training; layout.json is checked)", "lora": "yes (tune ⇄ merge_lora2hf)",
           "config": "= config.json", "dtype": "should (--params-dtype of hf2mcore)",
           "seq": "= seq_length of the data conversion (instruction data)", "runtime": "no (runtime only)", "no": "no"},
    "zh": {"shard": "是（转换 ⇄ 训练；加载时校验 layout.json）", "lora": "是（微调 ⇄ merge_lora2hf）",
           "config": "须等于 config.json", "dtype": "建议（hf2mcore 的 --params-dtype）",
           "seq": "= 数据转换的 seq_length（指令数据）", "runtime": "否（仅运行时）", "no": "否"},
}


def parsers() -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(table id, command, parser) for every CLI a user runs."""
    from ckpt_convert.cli import build_parser as convert_parser
    from mindspeed_dsv.data.preprocess import build_parser as preprocess_parser
    from mindspeed_dsv.plan import build_parser as plan_parser
    from mindspeed_dsv.training.arguments import build_parser as train_parser

    out = [("train", "python -m mindspeed_dsv.train / pretrain_gpt.py / posttrain_gpt.py", train_parser()),
           ("preprocess", "python preprocess_data.py", preprocess_parser())]
    top = convert_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        out.append((f"convert-{name}", f"python -m ckpt_convert {name}", p))
    out.append(("plan", "python -m mindspeed_dsv.plan", plan_parser()))
    from mindspeed_dsv.platform.check import build_parser as check_parser

    out.append(("check", "python -m mindspeed_dsv.platform.check", check_parser()))
    return out


def flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in flags(parser) for o in a.option_strings}


def _match(table: str, action: argparse.Action) -> str:
    names = set(action.option_strings)
    if names & _SHARD:
        return "shard"
    if table == "train":
        if names & _LORA:
            return "lora"
        if names & _CONFIG:
            return "config"
        if "--bf16" in names:
            return "dtype"
        if "--seq-length" in names:
            return "seq"
        if names & {"--sequence-parallel", "--context-parallel-size"}:
            return "runtime"
    if table.startswith("convert") and names & {"--sequence-parallel", "--context-parallel-size"}:
        return "runtime"
    if table.startswith("convert") and names & _LORA:
        return "lora"
    return "no"


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        return "off" if action.default in (False, None) else "on"
    if action.required:
        return "required"
    d = action.default
    if d is None or d == argparse.SUPPRESS:
        return "–"
    if isinstance(d, (list, tuple)):
        return " ".join(map(str, d)) or "–"
    return str(d)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render(table: str, parser: argparse.ArgumentParser, lang: str, zh_help: dict[str, str]) -> str:
    head = {"en": "| flag | meaning | default | must match |\n|---|---|---|---|",
            "zh": "| 参数 | 说明 | 默认值 | 需要一致 |\n|---|---|---|---|"}[lang]
    rows = [head]
    for a in flags(parser):
        names = ", ".join(f"`{o}`" for o in a.option_strings)
        if a.choices:
            names += " {" + ",".join(map(str, a.choices)) + "}"
        meaning = (a.help or "") % {"default": a.default} if a.help and "%(" in (a.help or "") else (a.help or "")
        if lang == "zh":  # the hand-written Chinese meaning; the English help where none is written yet
            meaning = next((zh_help[o] for o in a.option_strings if o in zh_help), meaning)
        rows.append(f"| {names} | {_cell(meaning)} | {_cell(_default(a))} | {MATCH[lang][_match(table, a)]} |")
    return "\n".join(rows)


def zh_glossary() -> dict[str, str]:
    """Hand-written Chinese meanings (tests/examples/zh_glossary.py)."""
    from tests.examples.zh_glossary import ZH

    return ZH


def update(text: str, lang: str) -> str:
    zh = zh_glossary()
    for table, _cmd, parser in parsers():
        begin, end = f"<!-- flags:{table}:begin -->", f"<!-- flags:{table}:end -->"
        block = f"{begin}\n{render(table, parser, lang, zh)}\n{end}"
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"docs/{lang}/flags.md: markers {begin} / {end} missing")
        text = pattern.sub(lambda _m: block, text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true")
    g.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    stale = []
    for lang in ("en", "zh"):
        path = os.path.join(ROOT, "docs", lang, "flags.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = update(text, lang)
        if new != text:
            stale.append(path)
            if args.write:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    if args.check and stale:
        print("out of date (run python -m tests.examples.flag_tables --write): " + ", ".join(stale))
        return 1
    print(("rewrote " + ", ".join(stale)) if (args.write and stale) else "flag tables up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
