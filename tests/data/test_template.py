"""The DeepSeek-V3/R1 template agrees with the tokenizer's own chat template, token for token."""

import json
import os

import numpy as np
import pytest

from tests.data.conftest import DATA, read_jsonl
from mindspeed_dsv.data.handlers import get_handler
from mindspeed_dsv.data.templates import DeepSeek3Template

CASES = [
    ("AlpacaStyleInstructionHandler", "alpaca_builtins.jsonl"),
    ("SharegptStyleInstructionHandler", "sharegpt_methods.jsonl"),
    ("OpenAIStyleInstructionHandler", "openai_topics.jsonl"),
]


@pytest.mark.parametrize("handler_name,fname", CASES)
def test_agrees_with_apply_chat_template(tok, handler_name, fname):
    h = get_handler(handler_name, tok)
    rows = read_jsonl(os.path.join(DATA, fname))
    records = [(f"{fname}, line {i + 1}", r) for i, r in enumerate(rows)]
    results = h.tokenize_batch(records)
    for (where, row), (ids, labels) in zip(records, results):
        messages, tools = h.to_messages(where, row)
        ref = tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"]
        assert ids.tolist() == list(ref), where
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
        assert "".join(t for t, _ in DeepSeek3Template().render(messages, tools)) == text, where


def test_literal_deepseek_layout(tok):
    # independent reference: the DeepSeek-V3/R1 layout written out by hand
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "loss": False},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "add", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": {"x": "2+2"}}}]},
        {"role": "tool", "content": "4"},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "4"},
    ]
    expected = (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜>"
        "<｜User｜>2+2?<｜Assistant｜><think>\nadd\n</think>\n\n"
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>calc\n```json\n{\"x\": \"2+2\"}\n```"
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>4<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>ok"
        "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>4<｜end▁of▁sentence｜>"
    )
    assert tok.apply_chat_template(msgs, tokenize=False) == expected
    segs = DeepSeek3Template().render(msgs)
    assert "".join(t for t, _ in segs) == expected
    loss_text = "".join(t for t, loss in segs if loss)
    assert loss_text == (
        "<think>\nadd\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>calc\n```json\n"
        "{\"x\": \"2+2\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>4<｜end▁of▁sentence｜>"
    )
    # generation prompt matches DeepSeek-V3's
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<｜User｜>Hi<｜Assistant｜>")


def test_labels_cover_exactly_the_assistant_turns(tok):
    h = get_handler("OpenAIStyleInstructionHandler", tok)
    row = {"messages": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "loss": False},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning_content": "r"}]}
    ids, labels = h.tokenize_batch([("x", row)])[0]
    kept = labels[labels != -100]
    assert tok.decode(kept.tolist()) == "<think>\nr\n</think>\n\na2<｜end▁of▁sentence｜>"
    assert np.array_equal(ids[labels != -100], kept)
    assert tok.decode(ids.tolist()) == tok.apply_chat_template(row["messages"], tokenize=False)


def test_tokenizer_contract(tok):
    assert len(tok) == 4096
    assert [tok.convert_ids_to_tokens(i) for i in range(3)] == [
        "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    with open(os.path.join(os.path.dirname(DATA), "tiny_deepseek3", "config.json")) as f:
        assert json.load(f)["vocab_size"] == len(tok)
    for t in ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜tool▁calls▁begin｜>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert tok("x")["input_ids"][0] == 0  # BOS prepended like DeepSeek-V3's tokenizer
