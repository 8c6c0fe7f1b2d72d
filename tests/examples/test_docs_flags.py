"""Every flag the code accepts (training, preprocess, each ckpt_convert command, plan) is listed in the flag tables
of both docs/en/flags.md and docs/zh/flags.md, and the tables are what the parsers generate today."""

from __future__ import annotations

import os
import re

import pytest

from tests.examples.flag_tables import ROOT, option_names, parsers, update

PAGES = {lang: os.path.join(ROOT, "docs", lang, "flags.md") for lang in ("en", "zh")}


def table_flags(text: str, table: str) -> set[str]:
    m = re.search(rf"<!-- flags:{re.escape(table)}:begin -->(.*?)<!-- flags:{re.escape(table)}:end -->", text, re.S)
    assert m, f"table {table} missing"
    rows = [line for line in m.group(1).splitlines() if line.startswith("| `")]
    return {f for row in rows for f in re.findall(r"`(--?[A-Za-z0-9][\w-]*)`", row.split(" | ")[0])}


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_flag_in_both_languages(lang):
    text = open(PAGES[lang], encoding="utf-8").read()
    for table, command, parser in parsers():
        missing = option_names(parser) - {"-h", "--help"} - table_flags(text, table)
        assert not missing, f"docs/{lang}/flags.md, {command}: flags not documented: {sorted(missing)}"


def test_parsers_cover_the_clis():
    names = {t for t, _, _ in parsers()}
    assert {"train", "preprocess", "convert-hf2mcore", "convert-mcore2hf", "convert-reshard", "convert-verify",
            "plan"} <= names
    train = next(p for t, _, p in parsers() if t == "train")
    # spot-check against flags the scripts rely on (independent of the generator)
    assert {"--lora-ckpt-filter", "--tensor-model-parallel-size", "--is-instruction-dataset", "--finetune"} <= option_names(train)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_tables_are_current(lang):
    text = open(PAGES[lang], encoding="utf-8").read()
    assert update(text, lang) == text, "run: python -m tests.examples.flag_tables --write"


def test_same_pages_in_both_languages():
    en = sorted(os.listdir(os.path.join(ROOT, "docs", "en")))
    zh = sorted(os.listdir(os.path.join(ROOT, "docs", "zh")))
    assert en == zh
