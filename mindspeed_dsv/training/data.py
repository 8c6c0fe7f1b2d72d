"""Micro-batch iterators for the loop, built from mindspeed_dsv.data's datasets.

Every model chunk gets its own iterator over the same deterministic order (megatron's schedules call the
forward step once per chunk and micro-batch, and each call draws from its chunk's iterator).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mindspeed_dsv.data.checks import InputError, find_out_of_vocab, load_tokenizer
from mindspeed_dsv.data.datasets import (
    SFTDataset,
    attention_mask_from_segment_ids,
    build_pretrain_datasets,
    build_sft_dataloader,
    sft_dataset_prefixes,
)
from mindspeed_dsv.platform import current_platform
from mindspeed_dsv.training.arguments import tokenizer_dir
from mindspeed_dsv.training.inputs import data_prefixes


class _VocabChecked:
    """Stops at the first micro-batch holding a token id the embedding does not have, naming the dataset file,
    the sequence, the id and the vocabulary (the embedding lookup would fail with a bare IndexError on cpu and a
    device-side assert on cuda/npu). One max() over the micro-batch's tokens; the .bin is searched only then."""

    def __init__(self, it, vocab_size: int, prefixes: list[str]):
        self.it, self.vocab_size, self.prefixes = it, vocab_size, prefixes

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        top = int(batch["tokens"].max())
        if top >= self.vocab_size:
            raise InputError(out_of_vocab_message(self.prefixes, self.vocab_size, top))
        return batch


def out_of_vocab_message(prefixes: list[str], vocab_size: int, top: int) -> str:
    for prefix in prefixes:
        found = find_out_of_vocab(prefix, vocab_size)
        if found is not None:
            seq, pos, token = found
            return (f"{prefix}.bin: token id {token} (sequence {seq}, position {pos}) is >= the model's vocabulary "
                    f"size {vocab_size} (config.json vocab_size); was the data tokenized with another tokenizer?")
    return (f"--data-path {' '.join(prefixes)}: a batch holds token id {top} >= the model's vocabulary size "
            f"{vocab_size} (config.json vocab_size)")


class RealTokens:
    """Tokens of real samples (padding excluded) drawn by this rank's first model chunk since the last ``take``.

    ``take`` sums them over the data-parallel ranks, which draw different micro-batches; the tensor and pipeline
    ranks of one data-parallel replica draw the same ones, so they are not summed over. Every rank must call it."""

    def __init__(self):
        self.local = 0

    def add(self, n: int) -> None:
        self.local += int(n)

    def take(self) -> int:
        total = torch.tensor([self.local], dtype=torch.int64, device=current_platform().device())
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        self.local = 0
        return int(total.item())


class _SFTBatches:
    """SFT rows -> the batch dict the forward step reads; packed samples are kept apart by the attention mask
    (rotary is relative, so a sample placed later in a row computes exactly what it computes alone)."""

    def __init__(self, loader, counter: RealTokens | None = None):
        self.it = iter(loader)
        self.counter = counter

    def __iter__(self):
        return self

    def __next__(self):
        row = next(self.it)
        if self.counter is not None:
            self.counter.add((row["segment_ids"] > 0).sum())  # segment 0 is padding
        return {
            "tokens": row["tokens"],
            "labels": row["labels"],
            "loss_mask": row["loss_mask"],
            "position_ids": row["position_ids"],
            "attention_mask": attention_mask_from_segment_ids(row["segment_ids"]),
        }


class _CountedBatches:
    """Pretraining batches with their tokens counted: GPTDataset fills every row with document tokens."""

    def __init__(self, it, counter: RealTokens):
        self.it, self.counter = it, counter

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.counter.add(batch["tokens"].numel())
        return batch


def _sft_iterators(args, dp_rank, dp_size, consumed, chunks, cfg, counter):
    if len(args.data_path) != 1:
        raise InputError("--is-instruction-dataset takes one --data-path prefix (blending is for pretraining)")
    prefix = args.data_path[0]
    pad = load_tokenizer(tokenizer_dir(args)).pad_token_id
    dataset = SFTDataset(prefix, args.seq_length, pad_token_id=pad if pad is not None else 0)

    def one(chunk):
        loader = build_sft_dataloader(
            dataset, args.micro_batch_size, dp_rank, dp_size, seed=args.seed, consumed_samples=consumed,
            shuffle=not args.no_shuffle, num_workers=args.num_workers,
        )
        return _VocabChecked(_SFTBatches(loader, counter if chunk == 0 else None), cfg.vocab_size,
                             [sft_dataset_prefixes(prefix)["input_ids"]])

    return [one(c) for c in range(chunks)], None


def _pretrain_iterators(args, dp_rank, dp_size, consumed, chunks, cfg, counter):
    gbs = args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters * gbs if args.eval_interval else 0
    train, valid, _ = build_pretrain_datasets(
        data_path=args.data_path,
        seq_length=args.seq_length,
        seed=args.seed,
        train_valid_test_num_samples=(args.train_iters * gbs, evals, 0),
        tokenizer_path=tokenizer_dir(args),
        split=args.split,
    )

    def loader(ds, start):
        # GPTDataset already shuffled its samples by seed, so ranks walk it in order.
        return _VocabChecked(iter(build_sft_dataloader(ds, args.micro_batch_size, dp_rank, dp_size, seed=args.seed,
                                                       consumed_samples=start, shuffle=False,
                                                       num_workers=args.num_workers)),
                             cfg.vocab_size, data_prefixes(args))

    train_iters = [loader(train, consumed) for _ in range(chunks)]
    train_iters[0] = _CountedBatches(train_iters[0], counter)
    valid_iters = [loader(valid, 0) for _ in range(chunks)] if (valid is not None and evals) else None
    return train_iters, valid_iters


def build_data_iterators(args, layout, consumed_samples: int, cfg):
    """([train iterator per model chunk], [valid iterator per chunk] or None, RealTokens of the train batches)."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    chunks = layout.num_model_chunks
    counter = RealTokens()
    build = _sft_iterators if args.is_instruction_dataset else _pretrain_iterators
    return (*build(args, dp_rank, dp_size, consumed_samples, chunks, cfg, counter), counter)
