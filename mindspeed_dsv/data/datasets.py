"""The datasets the training loop reads.

Pretrain (Megatron GPTDataset, blending through BlendedMegatronDatasetBuilder)::

    train, valid, test = build_pretrain_datasets(
        data_path=["out/pydoc_text_document"],   # or ["0.7", "a_text_document", "0.3", "b_text_document"]
        seq_length=256, seed=1234, train_valid_test_num_samples=(1000, 10, 0),
        tokenizer_path="assets/tiny_deepseek3", split="98,2,0")
    train[i] -> {"tokens", "labels", "loss_mask", "position_ids", ("attention_mask")}   # megatron's own dict

SFT (rows written by ``preprocess`` with an instruction handler)::

    ds = SFTDataset("out/alpaca", seq_length=256)      # reads out/alpaca_packed_{input_ids,labels,attention_mask}_document
    ds[i] -> {"tokens":       int64 [S]  input ids, padded with pad id,
              "labels":       int64 [S]  next-token targets (labels[t] is the target for tokens[t]); pad id where masked,
              "loss_mask":    float32 [S] 1.0 where labels[t] is learnt,
              "position_ids": int64 [S]  restart at 0 at every packed sample,
              "segment_ids":  int64 [S]  1-based sample index inside the row, 0 on padding (attention boundaries)}
    loader = build_sft_dataloader(ds, micro_batch_size=4, dp_rank=r, dp_size=n, seed=1234, consumed_samples=k)

Helpers to turn ``segment_ids`` into what attention needs: ``cu_seqlens_from_segment_ids`` (THD/varlen) and
``attention_mask_from_segment_ids`` (Megatron's boolean mask, True = masked).

Sharding: ``DataParallelSampler`` walks one global, seed-determined order (a fresh permutation per epoch), and
rank r of n takes micro-batch slot r of every global batch of ``micro_batch_size * n`` samples. The order
depends only on (seed, dataset length, global batch), so resuming with ``consumed_samples`` continues exactly
where training stopped, for any dp_size whose global batch divides the consumed count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

IGNORE_INDEX = -100
SFT_KEYS = ("input_ids", "labels", "attention_mask")


def sft_dataset_prefixes(path_prefix: str) -> Dict[str, str]:
    """``{"input_ids": "{p}_packed_input_ids_document", ...}`` — the names ``preprocess`` writes."""
    return {k: f"{path_prefix}_packed_{k}_document" for k in SFT_KEYS}


# ------------------------------------------------------------------------------------------------ pretrain
@dataclass
class TokenizerInfo:
    """The tokenizer attributes megatron's GPTDataset reads (vocab_size, eod, pad); built from a HF tokenizer
    directory so the dataset does not need a MegatronTokenizer."""

    vocab_size: int
    eod: int
    pad: int
    bos: Optional[int] = None
    special_tokens_dict: Dict[str, int] = field(default_factory=dict)

    @property
    def unique_identifiers(self) -> Dict[str, object]:
        # megatron hashes this into the name of its cached sample indices
        return {"class": "TokenizerInfo", "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}

    @classmethod
    def from_pretrained(cls, path: str) -> "TokenizerInfo":
        from mindspeed_dsv.data.checks import load_tokenizer  # checks imports this module

        tok = load_tokenizer(path)
        special = {k: getattr(tok, f"{k}_id") for k in ("bos_token", "eos_token", "pad_token")
                   if getattr(tok, f"{k}_id", None) is not None}
        return cls(vocab_size=len(tok), eod=tok.eos_token_id, pad=tok.pad_token_id, bos=tok.bos_token_id,
                   special_tokens_dict=special)


def build_pretrain_datasets(
    data_path: Sequence[str],
    seq_length: int,
    seed: int,
    train_valid_test_num_samples: Tuple[int, int, int],
    tokenizer_path: Optional[str] = None,
    tokenizer: Optional[TokenizerInfo] = None,
    split: str = "100,0,0",
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
    path_to_cache: Optional[str] = None,
    is_built_on_rank=lambda: True,
):
    """(train, valid, test) megatron GPTDataset / BlendedDataset (None for a split with no samples).

    ``data_path`` follows Megatron's ``--data-path``: prefixes, optionally interleaved with weights.
    ``path_to_cache`` defaults to a ``cache/`` folder next to each dataset (megatron's default); a blend built
    outside torch.distributed ignores it (megatron's BlendedDataset needs a process group to save it).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    from mindspeed_dsv.data.checks import check_indexed_dataset  # checks imports this module

    blend = get_blend_from_list(list(data_path))
    for prefix in blend[0]:
        check_indexed_dataset(prefix)  # missing or truncated .bin/.idx: named here, not by numpy later
    if tokenizer is None:
        if tokenizer_path is None:
            raise ValueError("pass tokenizer_path or tokenizer")
        tokenizer = TokenizerInfo.from_pretrained(tokenizer_path)
    if path_to_cache and len(blend[0]) > 1 and not torch.distributed.is_initialized():
        # megatron's BlendedDataset asks torch.distributed for the rank when it saves its cache; without a
        # process group (single-process tools, tests) build the blend indices in memory instead.
        path_to_cache = None
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=path_to_cache,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    return BlendedMegatronDatasetBuilder(
        GPTDataset, list(train_valid_test_num_samples), is_built_on_rank, config
    ).build()


# ------------------------------------------------------------------------------------------------ SFT
class SFTDataset(torch.utils.data.Dataset):
    """Fixed-length SFT samples from the three ``_packed_*_document`` datasets (see module docstring).

    Rows shorter than ``seq_length`` (unpacked data) are padded; longer rows are an error, since they mean the
    data was preprocessed for a longer ``--seq-length``.
    """

    def __init__(self, path_prefix: str, seq_length: int, pad_token_id: int = 2):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.seq_length = seq_length
        self.pad_token_id = pad_token_id
        self.data = {}
        from mindspeed_dsv.data.checks import check_indexed_dataset  # checks imports this module

        for key, prefix in sft_dataset_prefixes(path_prefix).items():
            check_indexed_dataset(prefix)  # missing or truncated .bin/.idx: named here, not by numpy later
            self.data[key] = IndexedDataset(prefix)
        lens = [d.sequence_lengths for d in self.data.values()]
        if not all(np.array_equal(lens[0], x) for x in lens[1:]):
            raise ValueError(f"{path_prefix}: input_ids / labels / attention_mask datasets are not aligned")
        too_long = int(lens[0].max(initial=0))
        if too_long > seq_length:
            raise ValueError(f"{path_prefix}: rows of {too_long} tokens > seq_length {seq_length}; "
                             "preprocess again with this --seq-length")

    def __len__(self) -> int:
        return len(self.data["input_ids"])

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        S = self.seq_length
        ids = np.full(S, self.pad_token_id, np.int64)
        stored_labels = np.full(S + 1, IGNORE_INDEX, np.int64)  # +1: the shift reads one past the row
        seg = np.zeros(S, np.int64)
        row = self.data["input_ids"][idx]
        n = len(row)
        ids[:n] = row
        stored_labels[:n] = self.data["labels"][idx]
        seg[:n] = self.data["attention_mask"][idx]

        # target for position t is the stored label at t+1, unless t+1 starts another sample
        nxt = stored_labels[1:].copy()
        nxt[:-1][seg[1:] != seg[:-1]] = IGNORE_INDEX
        loss_mask = (nxt != IGNORE_INDEX).astype(np.float32)
        labels = np.where(nxt == IGNORE_INDEX, self.pad_token_id, nxt)
        return {
            "tokens": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids_from_segment_ids(seg)),
            "segment_ids": torch.from_numpy(seg),
        }


def position_ids_from_segment_ids(seg: np.ndarray) -> np.ndarray:
    """0, 1, 2... restarting wherever the segment id changes."""
    n = len(seg)
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    pos = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return pos.astype(np.int64)


def cu_seqlens_from_segment_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """int32 cumulative sequence lengths of one row ([S] tensor), padding counted as its own sequence."""
    seg = segment_ids.reshape(-1)
    change = torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), change, torch.tensor([seg.numel()])]).to(torch.int32)


def attention_mask_from_segment_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """Megatron boolean mask [B, 1, S, S], True = masked: causal and no attention across samples."""
    seg = segment_ids if segment_ids.dim() == 2 else segment_ids.unsqueeze(0)
    S = seg.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    same = seg.unsqueeze(-1) == seg.unsqueeze(-2)
    return ~(causal & same).unsqueeze(1)


class DataParallelSampler(torch.utils.data.Sampler):
    """Batch sampler yielding this rank's micro-batches (lists of indices), endless over epochs.

    Global sample k of the run is ``perm_e[k % n_per_epoch]`` with ``e = k // n_per_epoch`` and
    ``perm_e = RandomState(seed + e).permutation(len)`` (identity when ``shuffle=False``); the tail that does
    not fill a global batch is dropped each epoch. Rank r takes micro-batch slot r of every global batch.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 consumed_samples: int = 0, shuffle: bool = True):
        gbs = micro_batch_size * dp_size
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if num_samples < gbs:
            raise ValueError(f"{num_samples} samples < one global batch ({micro_batch_size} x {dp_size})")
        if consumed_samples % gbs:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of the global batch {gbs}")
        self.num_samples, self.mbs, self.rank, self.dp = num_samples, micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.consumed = seed, shuffle, consumed_samples
        self.per_epoch = num_samples - num_samples % gbs

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.RandomState((self.seed + epoch) % 2**32).permutation(self.num_samples)

    def __iter__(self) -> Iterator[List[int]]:
        gbs = self.mbs * self.dp
        k = self.consumed
        while True:
            epoch, off = divmod(k, self.per_epoch)
            order = self._order(epoch)
            for start in range(off, self.per_epoch, gbs):
                lo = start + self.rank * self.mbs
                yield order[lo:lo + self.mbs].tolist()
            k = (epoch + 1) * self.per_epoch


def build_sft_dataloader(dataset: torch.utils.data.Dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                         seed: int, consumed_samples: int = 0, shuffle: bool = True, num_workers: int = 0
                         ) -> torch.utils.data.DataLoader:
    """Endless DataLoader of this rank's micro-batches (dict of [micro_batch_size, S] tensors)."""
    sampler = DataParallelSampler(len(dataset), micro_batch_size, dp_rank, dp_size, seed, consumed_samples, shuffle)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=False)
