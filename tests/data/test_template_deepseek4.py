"""--prompt-type deepseek4: the DeepSeek-V4 release's chat encoding (encoding/encoding_dsv4.py, encode_messages with
drop_thinking), the tiny V4 tokenizer's chat template, and the preprocess CLI's loss mask."""

import json
import os

import numpy as np
import pytest

from mindspeed_dsv.data.templates import DeepSeek4Template, TemplateError, _v4_tools_text
from tests.data.conftest import DATA, REPO

TOKENIZER4 = os.path.join(REPO, "assets", "tiny_deepseek4")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# Expected texts: the release's encode_messages(messages, thinking_mode) output for each conversation (thinking
# mode where an answer has reasoning; tools on the first system message), copied verbatim; {TOOLS} stands for
# the release's tools section.
CASES = [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r1"},
      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning_content": "r2"}], None,
     BOS + "<｜User｜>a<｜Assistant｜></think>b" + EOS + "<｜User｜>c<｜Assistant｜><think>r2</think>d" + EOS),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "weather?"},
      {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
          "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
      {"role": "tool", "content": "sunny"}, {"role": "user", "content": "and?"},
      {"role": "assistant", "content": "Sunny."}], TOOLS,
     BOS + "S\n\n{TOOLS}<｜User｜>weather?<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n"
     "<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
     "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
     + EOS + "<｜User｜><tool_result>sunny</tool_result>\n\nand?<｜Assistant｜></think>Sunny." + EOS),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "a", "reasoning_content": "t"},
      {"role": "tool", "content": "out"}, {"role": "assistant", "content": "z", "reasoning_content": "t2"}], None,
     BOS + "<｜User｜>x<｜Assistant｜></think>a" + EOS + "<｜User｜><tool_result>out</tool_result><｜Assistant｜><think>t2</think>z"
     + EOS),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_equals_release_encoding(case):
    messages, tools, want = CASES[case]
    want = want.replace("{TOOLS}", _v4_tools_text(TOOLS)) if tools else want
    segs = DeepSeek4Template().render(messages, tools)
    assert "".join(t for t, _ in segs) == want
    # loss exactly on the answers: what follows each "<｜Assistant｜><think>"/"</think>" up to and with EOS
    assert all(t.endswith(EOS) for t, loss in segs if loss)
    assert [t for t, loss in segs if loss][-1].endswith(messages[-1]["content"] + EOS)


def test_tools_section_is_the_release_text():
    text = _v4_tools_text(TOOLS)
    assert text.startswith("## Tools\n\nYou have access to a set of tools")
    assert text.endswith('{"name": "get_weather", "description": "d", "parameters": {"type": "object", '
                         '"properties": {"city": {"type": "string"}}}}\n\nYou MUST strictly follow the above '
                         "defined tool name and parameter schemas to invoke tool calls.\n")


def test_refusals():
    with pytest.raises(TemplateError, match="no assistant turn"):
        DeepSeek4Template().render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError, match="unknown role 'developer'"):
        DeepSeek4Template().render([{"role": "developer", "content": "x"}, {"role": "assistant", "content": "y"}])


def test_tiny_tokenizer_chat_template_and_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER4)
    assert len(tok) == 4096 and tok.bos_token_id == 0 and tok.eos_token_id == 1
    assert tok.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜"]) == [
        4080, 4081, 4082, 4083, 4084]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "user", "content": "there"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ok"}]
    segs = DeepSeek4Template().render(msgs)
    text = "".join(t for t, _ in segs)
    assert tok.apply_chat_template(msgs, tokenize=False) == text
    # segment by segment tokenizes like the whole text (every boundary is an added token)
    by_seg = sum((tok(t, add_special_tokens=False)["input_ids"] for t, _ in segs), [])
    assert by_seg == tok(text, add_special_tokens=False)["input_ids"]


def test_preprocess_cli_deepseek4(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from mindspeed_dsv.data.preprocess import main

    src = tmp_path / "chat.jsonl"
    rows = [{"instruction": "What is 2+2?", "input": "", "output": "4"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue", "system": "Be brief."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = str(tmp_path / "sft")
    assert main(["--input", str(src), "--output-prefix", prefix, "--tokenizer-name-or-path", TOKENIZER4,
                 "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "deepseek4",
                 "--no-progress"]) == 0
    tok = AutoTokenizer.from_pretrained(TOKENIZER4)
    ids_ds = IndexedDataset(f"{prefix}_packed_input_ids_document")
    lab_ds = IndexedDataset(f"{prefix}_packed_labels_document")
    for i, r in enumerate(rows):
        ids, labels = ids_ds[i], lab_ds[i]
        msgs = ([{"role": "system", "content": r["system"]}] if "system" in r else []) + [
            {"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        assert ids.tolist() == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        loss = labels != -100
        assert tok.decode(ids[loss].tolist()) == r["output"] + EOS
        assert np.array_equal(labels[loss], ids[loss])
