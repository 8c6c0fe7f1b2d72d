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
