"""SFT rows decode back to the templated text, loss exactly on assistant parts; packing invariants."""

import os

import numpy as np
import pytest

from tests.data.conftest import DATA, read_jsonl, run_preprocess
from mindspeed_dsv.data.handlers import get_handler
from mindspeed_dsv.data.packing import neat_pack

FILES = {
    "AlpacaStyleInstructionHandler": "alpaca_builtins.jsonl",
    "SharegptStyleInstructionHandler": "sharegpt_methods.jsonl",
    "OpenAIStyleInstructionHandler": "openai_topics.jsonl",
}


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return [IndexedDataset(f"{prefix}_packed_{k}_document") for k in ("input_ids", "labels", "attention_mask")]


def _reference(tok, handler_name):
    """Per sample: templated ids from apply_chat_template, and the text that must carry loss, built directly
    from the messages (assistant turns with loss: reasoning block + content/tool calls + EOS)."""
    h = get_handler(handler_name, tok)
    out = []
    for i, row in enumerate(read_jsonl(os.path.join(DATA, FILES[handler_name]))):
        msgs, tools = h.to_messages(str(i), row)
        ids = tok.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=True)["input_ids"]
        out.append((list(ids), msgs))
    return out


@pytest.mark.parametrize("handler_name", sorted(FILES))
def test_unpacked_rows_decode_to_template(tmp_path, tok, handler_name):
    rc, prefix = run_preprocess(tmp_path, "sft", os.path.join(DATA, FILES[handler_name]), handler_name)
    assert rc == 0
    ids_ds, lab_ds, seg_ds = _read(prefix)
    ref = _reference(tok, handler_name)
    assert len(ids_ds) == len(ref)
    for i, (ref_ids, msgs) in enumerate(ref):
        ids, labels, seg = ids_ds[i], lab_ds[i], seg_ds[i]
        assert ids.tolist() == ref_ids
        assert set(seg.tolist()) == {1}
        loss_pos = labels != -100
        assert np.array_equal(labels[loss_pos], ids[loss_pos])
        # the loss tokens, decoded run by run, are exactly the assistant turns that carry loss
        runs = np.split(np.arange(len(ids))[loss_pos], np.flatnonzero(np.diff(np.flatnonzero(loss_pos)) > 1) + 1)
        decoded = [tok.decode(ids[r].tolist()) for r in runs if len(r)]
        want = [m for m in msgs if m["role"] == "assistant" and m.get("loss", True)]
        assert len(decoded) == len(want), i
        for text, m in zip(decoded, want):
            assert text.endswith("<｜end▁of▁sentence｜>")
            assert (m.get("content") or "") in text
            if m.get("reasoning_content"):
                assert text.startswith("<think>\n" + m["reasoning_content"] + "\n</think>\n\n")


def test_pack_and_neat_pack_invariants(tmp_path, tok):
    name = "OpenAIStyleInstructionHandler"
    src = os.path.join(DATA, FILES[name])
    S = 96
    rc, plain = run_preprocess(tmp_path, "plain", src, name)
    rc2, packed = run_preprocess(tmp_path, "pack", src, name, "--seq-length", str(S), "--pack")
    rc3, neat = run_preprocess(tmp_path, "neat", src, name, "--seq-length", str(S), "--neat-pack")
    assert rc == rc2 == rc3 == 0
    plain_ids, plain_labels, _ = _read(plain)
    # copies: rows are views into the datasets' memory maps
    samples = [(np.array(plain_ids[i]), np.array(plain_labels[i])) for i in range(len(plain_ids))]
    assert max(len(a) for a, _ in samples) <= S  # nothing truncated, so all three hold the same tokens
    pad = tok.pad_token_id

    # --pack: every row exactly S; the non-padding stream is the samples concatenated in order
    ids_ds, lab_ds, seg_ds = _read(packed)
    assert all(len(ids_ds[i]) == S for i in range(len(ids_ds)))
    stream = np.concatenate([ids_ds[i][seg_ds[i] > 0] for i in range(len(ids_ds))])
    lstream = np.concatenate([lab_ds[i][seg_ds[i] > 0] for i in range(len(ids_ds))])
    assert np.array_equal(stream, np.concatenate([a for a, _ in samples]))
    assert np.array_equal(lstream, np.concatenate([b for _, b in samples]))
    assert len(ids_ds) == -(-len(stream) // S)
    last = len(ids_ds) - 1
    assert np.all(ids_ds[last][seg_ds[last] == 0] == pad) and np.all(lab_ds[last][seg_ds[last] == 0] == -100)

    # --neat-pack: rows of S, every segment is one whole sample, every sample appears exactly once
    ids_ds, lab_ds, seg_ds = _read(neat)
    seen = []
    for i in range(len(ids_ds)):
        ids, lab, seg = ids_ds[i], lab_ds[i], seg_ds[i]
        assert len(ids) == S
        assert np.all(ids[seg == 0] == pad) and np.all(lab[seg == 0] == -100)
        assert np.all(np.diff(seg[seg > 0]) >= 0) and np.all(seg[:(seg > 0).sum()] > 0)  # padding at the end
        for k in np.unique(seg[seg > 0]):
            seen.append((tuple(ids[seg == k].tolist()), tuple(lab[seg == k].tolist())))
    assert sorted(seen) == sorted((tuple(a.tolist()), tuple(b.tolist())) for a, b in samples)
    assert len(ids_ds) == len(neat_pack([len(a) for a, _ in samples], S))


def test_neat_pack_bins():
    lengths = [5, 9, 3, 7, 1, 10, 4]
    bins = neat_pack(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == -(-sum(lengths) // 10)  # this case packs perfectly (39 tokens -> 4 bins)
    with pytest.raises(ValueError):
        neat_pack([11], 10)


def test_truncation_counted(tmp_path):
    rc, prefix = run_preprocess(tmp_path, "t", os.path.join(DATA, FILES["SharegptStyleInstructionHandler"]),
                                "SharegptStyleInstructionHandler", "--seq-length", "40", "--on-bad-sample", "skip")
    assert rc == 0
    import json

    s = json.load(open(prefix + "_summary.json"))
    ids_ds = _read(prefix)[0]
    assert max(ids_ds.sequence_lengths) <= 40
    assert s["truncated"] > 0
    assert s["documents"] + sum(s["dropped"].values()) == s["records"]
