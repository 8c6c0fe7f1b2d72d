"""documents -> .bin/.idx -> megatron IndexedDataset equals the tokenizer's own output."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.data.conftest import DATA, TOKENIZER, read_jsonl, run_preprocess


def _texts(n=None):
    return [r["text"] for r in read_jsonl(os.path.join(DATA, "pretrain_pydoc.jsonl"))][:n]


def test_roundtrip_and_blending(tmp_path, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "in.jsonl"
    texts = _texts(120)
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    rc, prefix = run_preprocess(tmp_path, "pt", src, "GeneralPretrainHandler", "--append-eod")
    assert rc == 0
    ds = IndexedDataset(prefix + "_text_document")
    assert len(ds) == len(texts)
    assert ds.index.dtype == np.uint16  # vocab 4096 fits
    for i, t in enumerate(texts):
        assert ds[i].tolist() == tok(t)["input_ids"] + [tok.eos_token_id]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    s = json.load(open(prefix + "_summary.json"))
    assert s["documents"] == len(texts) and s["tokens"] == int(ds.sequence_lengths.sum()) and s["dropped"] == {}

    # GPTDataset and a blend of two prefixes build on it
    from mindspeed_dsv.data.datasets import build_pretrain_datasets

    train, valid, _ = build_pretrain_datasets([prefix + "_text_document"], 32, 7, (50, 5, 0), TOKENIZER,
                                              split="90,10,0", path_to_cache=str(tmp_path / "cache"))
    sample = train[0]
    assert sample["tokens"].shape == (32,) and sample["labels"].shape == (32,)
    assert np.array_equal(sample["tokens"][1:].numpy(), sample["labels"][:-1].numpy())
    # the sample is a real window of the token stream
    stream = np.concatenate([ds[i] for i in range(len(ds))])
    first = sample["tokens"].numpy()
    hits = np.flatnonzero(stream[:-32] == first[0])
    assert any(np.array_equal(stream[h:h + 32], first) for h in hits)
    blend, _, _ = build_pretrain_datasets(["0.3", prefix + "_text_document", "0.7", prefix + "_text_document"],
                                          32, 7, (40, 0, 0), TOKENIZER, path_to_cache=str(tmp_path / "cache"))
    assert len(blend) >= 40 and blend[39]["tokens"].shape == (32,)


def test_json_keys_and_formats_agree(tmp_path, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = _texts(30)
    rows = [{"text": t, "title": t[:20]} for t in texts]
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (d / "b.json").write_text(json.dumps(rows[10:20]))
    pq.write_table(pa.Table.from_pylist(rows[20:]), d / "c.parquet")
    rc, prefix = run_preprocess(tmp_path, "multi", d, "GeneralPretrainHandler", "--json-keys", "text", "title")
    assert rc == 0
    text_ds, title_ds = IndexedDataset(prefix + "_text_document"), IndexedDataset(prefix + "_title_document")
    assert len(text_ds) == len(title_ds) == 30
    for i, r in enumerate(rows):  # directory order a.jsonl, b.json, c.parquet; no EOD without --append-eod
        assert text_ds[i].tolist() == tok(r["text"])["input_ids"]
        assert title_ds[i].tolist() == tok(r["title"])["input_ids"]


def test_two_workers_identical_to_one(tmp_path):
    src = os.path.join(DATA, "pretrain_pydoc.jsonl")
    outs = []
    for w in (1, 2):
        rc, prefix = run_preprocess(tmp_path, f"w{w}", src, "GeneralPretrainHandler", "--append-eod",
                                    "--workers", str(w))
        assert rc == 0
        outs.append(prefix)
    for ext in (".bin", ".idx"):
        a = open(outs[0] + "_text_document" + ext, "rb").read()
        b = open(outs[1] + "_text_document" + ext, "rb").read()
        assert a == b, ext
    # instruction data too
    outs = []
    for w in (1, 2):
        rc, prefix = run_preprocess(tmp_path, f"s{w}", os.path.join(DATA, "sharegpt_methods.jsonl"),
                                    "SharegptStyleInstructionHandler", "--workers", str(w), "--seq-length", "128",
                                    "--neat-pack")
        assert rc == 0
        outs.append(prefix)
    for k in ("input_ids", "labels", "attention_mask"):
        for ext in (".bin", ".idx"):
            a = open(f"{outs[0]}_packed_{k}_document{ext}", "rb").read()
            assert a == open(f"{outs[1]}_packed_{k}_document{ext}", "rb").read(), (k, ext)
