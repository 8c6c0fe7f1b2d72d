"""Bad input: a clear error naming file and line; with --on-bad-sample skip nothing else is lost."""

import json

import pytest

from tests.data.conftest import run_preprocess

GOOD = {"text": "A good line."}


def _write(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return path


CASES = [
    ("broken_json", "GeneralPretrainHandler", b'{"text": "unterminated\n', "malformed JSON"),
    ("missing_key", "GeneralPretrainHandler", {"body": "x"}, "missing key 'text'"),
    ("non_utf8", "GeneralPretrainHandler", b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
    ("empty_conv", "SharegptStyleInstructionHandler", {"conversations": []}, "empty conversation"),
    ("no_assistant", "OpenAIStyleInstructionHandler", {"messages": [{"role": "user", "content": "hi"}]},
     "no assistant turn"),
]
SFT_GOOD = {
    "SharegptStyleInstructionHandler": {"conversations": [{"from": "human", "value": "q"},
                                                          {"from": "gpt", "value": "a"}]},
    "OpenAIStyleInstructionHandler": {"messages": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a"}]},
}


@pytest.mark.parametrize("name,handler,bad,reason", CASES)
def test_fatal_names_file_and_line(tmp_path, capsys, name, handler, bad, reason):
    good = SFT_GOOD.get(handler, GOOD)
    src = _write(tmp_path / f"{name}.jsonl", [good, good, bad, good])
    rc, prefix = run_preprocess(tmp_path, name, src, handler)
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{src}, line 3: {reason}" in err
    assert not list(tmp_path.glob(f"{name}_*.bin")) and not list(tmp_path.glob("*.tmp"))  # nothing half-written


@pytest.mark.parametrize("name,handler,bad,reason", CASES)
def test_skip_reports_and_keeps_the_rest(tmp_path, capsys, name, handler, bad, reason):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    good = SFT_GOOD.get(handler, GOOD)
    src = _write(tmp_path / f"{name}.jsonl", [good, bad, good, b"\n", good])
    rc, prefix = run_preprocess(tmp_path, name, src, handler, "--on-bad-sample", "skip")
    assert rc == 0
    assert f"{src}, line 2: {reason}" in capsys.readouterr().err
    s = json.load(open(prefix + "_summary.json"))
    assert s["records"] == 4 and s["documents"] == 3  # the blank line is not a record
    assert sum(s["dropped"].values()) == 1 and s["dropped_records"][0].startswith(f"{src}, line 2: {reason}")
    out = s["outputs"][0]
    assert len(IndexedDataset(out)) == 3


def test_broken_json_array_file(tmp_path, capsys):
    src = tmp_path / "bad.json"
    src.write_text('[\n {"text": "a"},\n {"text": }\n]\n')
    rc, _ = run_preprocess(tmp_path, "arr", src)
    assert rc == 1 and f"{src}, line 3: malformed JSON" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_empty_input_file_is_refused_by_name(tmp_path, capsys, content):
    good = _write(tmp_path / "good.jsonl", [GOOD])
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(content)
    rc, prefix = run_preprocess(tmp_path, "e", f"{good},{empty}")
    assert rc == 1
    assert f"--input {empty}: empty input file (no records)" in capsys.readouterr().err
    assert not list(tmp_path.glob("e_*")) and not list(tmp_path.glob("*.tmp"))


def test_all_records_dropped_is_refused(tmp_path, capsys):
    src = _write(tmp_path / "bad.jsonl", [{"body": "x"}, {"body": "y"}])
    rc, prefix = run_preprocess(tmp_path, "d", src, "GeneralPretrainHandler", "--on-bad-sample", "skip")
    assert rc == 1
    assert "no documents to write (2 record(s), 2 dropped)" in capsys.readouterr().err
    assert not list(tmp_path.glob("d_*"))


def test_empty_responses_are_counted_and_reported(tmp_path, capsys, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rows = [{"instruction": "q1", "output": "a1"}, {"instruction": "q2", "output": ""},
            {"instruction": "q3", "output": "a3"}, {"instruction": "q4", "output": ""}]
    src = _write(tmp_path / "sft.jsonl", rows)
    rc, prefix = run_preprocess(tmp_path, "s", src, "AlpacaStyleInstructionHandler", "--seq-length", "64")
    assert rc == 0
    s = json.load(open(prefix + "_summary.json"))
    assert s["documents"] == 4  # still trained on (an empty answer can be the wanted one), but counted
    assert s["empty_responses"] == 2
    assert s["empty_response_records"] == [f"{src}, line 2", f"{src}, line 4"]
    assert f"empty responses (only the end-of-sentence token is learnt): 2, first at {src}, line 2" \
        in capsys.readouterr().out
    # independent check: the learnt tokens of rows 2 and 4 are exactly the tokenizer's EOS
    labels = IndexedDataset(prefix + "_packed_labels_document")
    for i in (1, 3):
        assert labels[i][labels[i] != -100].tolist() == [tok.eos_token_id]
    assert len(labels[0][labels[0] != -100]) > 1


@pytest.mark.parametrize("handler,keys,unknown", [
    ("AlpacaStyleInstructionHandler", {"instrucion": "q", "output": "a"}, "'instrucion'"),
    ("SharegptStyleInstructionHandler", {"conversation": "c"}, "'conversation'"),
    ("OpenAIStyleInstructionHandler", {"message": "m"}, "'message'"),
])
def test_map_keys_unknown_field_names_the_flag(tmp_path, capsys, handler, keys, unknown):
    src = _write(tmp_path / "x.jsonl", [{"q": "x", "a": "y"}])
    rc, _ = run_preprocess(tmp_path, "m", src, handler, "--map-keys", json.dumps(keys))
    err = capsys.readouterr().err
    assert rc == 1
    assert f"--map-keys: unknown field(s) {unknown} for --handler-name {handler}; valid fields: " in err
    from mindspeed_dsv.data.handlers import HANDLERS

    assert err.strip().endswith(", ".join(HANDLERS[handler].FIELDS))


def test_map_keys_with_pretrain_handler_is_refused(tmp_path, capsys):
    src = _write(tmp_path / "x.jsonl", [GOOD])
    rc, _ = run_preprocess(tmp_path, "m", src, "GeneralPretrainHandler", "--map-keys", '{"text": "body"}')
    assert rc == 1 and "--map-keys does not apply to --handler-name GeneralPretrainHandler" in capsys.readouterr().err


def test_map_keys_renames_columns(tmp_path):
    src = _write(tmp_path / "x.jsonl", [{"q": "question", "a": "answer"}])
    rc, prefix = run_preprocess(tmp_path, "m", src, "AlpacaStyleInstructionHandler",
                                "--map-keys", '{"instruction": "q", "output": "a"}')
    assert rc == 0 and json.load(open(prefix + "_summary.json"))["documents"] == 1
