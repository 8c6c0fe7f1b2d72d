"""SFTDataset: fixed length, next-token labels, loss only on assistant tokens, boundaries; DP sampler."""

import os

import numpy as np
import pytest
import torch

from tests.data.conftest import DATA, run_preprocess
from mindspeed_dsv.data.datasets import (DataParallelSampler, SFTDataset, attention_mask_from_segment_ids,
                                         build_sft_dataloader, cu_seqlens_from_segment_ids)


@pytest.fixture(scope="module")
def neat_prefix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sftds")
    rc, prefix = run_preprocess(tmp, "oa", os.path.join(DATA, "openai_topics.jsonl"),
                                "OpenAIStyleInstructionHandler", "--seq-length", "128", "--neat-pack")
    assert rc == 0
    return prefix


def test_sft_sample_matches_rows(neat_prefix, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = SFTDataset(neat_prefix, 128, pad_token_id=tok.pad_token_id)
    ids_ds = IndexedDataset(neat_prefix + "_packed_input_ids_document")
    lab_ds = IndexedDataset(neat_prefix + "_packed_labels_document")
    seg_ds = IndexedDataset(neat_prefix + "_packed_attention_mask_document")
    for i in range(len(ds)):
        s = ds[i]
        assert all(v.shape == (128,) for v in s.values())
        ids, lab, seg = ids_ds[i], lab_ds[i], seg_ds[i]
        assert s["tokens"].tolist() == ids.tolist()
        for t in range(127):  # direct formula: learn token t+1 from position t when both are in one sample
            learn = lab[t + 1] != -100 and seg[t] == seg[t + 1] and seg[t] > 0
            assert s["loss_mask"][t].item() == float(learn)
            if learn:
                assert s["labels"][t].item() == ids[t + 1]
        assert s["loss_mask"][127].item() == 0.0
        for k in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == k)
            assert s["position_ids"][where].tolist() == list(range(len(where)))
        assert s["tokens"][s["loss_mask"] > 0].numel() > 0
        # the learnt targets decode to assistant text ending in EOS
        tgt = s["labels"][s["loss_mask"] > 0].tolist()
        assert tgt.count(tok.eos_token_id) >= len(np.unique(seg[seg > 0]))


def test_boundaries_helpers():
    seg = torch.tensor([1, 1, 1, 2, 2, 0, 0])
    assert cu_seqlens_from_segment_ids(seg).tolist() == [0, 3, 5, 7]
    m = attention_mask_from_segment_ids(seg)[0, 0]
    assert m.shape == (7, 7)
    assert not m[4, 3] and m[3, 2] and m[1, 2] and not m[2, 0]  # causal, no crossing samples


def test_sampler_shards_and_resumes():
    n, mbs, dp, seed = 23, 2, 3, 5
    gbs = mbs * dp
    per_epoch = n - n % gbs
    def take(rank, consumed, steps):
        it = iter(DataParallelSampler(n, mbs, rank, dp, seed, consumed))
        return [next(it) for _ in range(steps)]
    full = [take(r, 0, 8) for r in range(dp)]
    # each step, the ranks together cover one global batch of distinct samples
    for step in range(8):
        batch = sum((full[r][step] for r in range(dp)), [])
        assert len(set(batch)) == gbs
    # epoch 0 (first per_epoch // gbs steps) is one permutation: no repeats
    steps0 = per_epoch // gbs
    ep0 = [i for step in range(steps0) for r in range(dp) for i in full[r][step]]
    assert len(set(ep0)) == per_epoch
    assert ep0 == np.random.RandomState(seed).permutation(n)[:per_epoch].tolist()
    # resume after 5 steps continues identically
    for r in range(dp):
        assert take(r, 5 * gbs, 3) == full[r][5:8]
    with pytest.raises(ValueError):
        DataParallelSampler(n, mbs, 0, dp, seed, consumed_samples=1)


def test_dataloader_batches(neat_prefix):
    ds = SFTDataset(neat_prefix, 128)
    b = next(iter(build_sft_dataloader(ds, micro_batch_size=2, dp_rank=1, dp_size=2, seed=0)))
    assert b["tokens"].shape == (2, 128) and b["loss_mask"].dtype == torch.float32
    with pytest.raises(ValueError, match="seq_length"):
        SFTDataset(neat_prefix, 64)
