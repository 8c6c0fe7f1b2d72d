"""Turn tokenized SFT samples into the rows that are written to disk.

Each row is three aligned int32 arrays:

* ``input_ids``
* ``labels``  — the token where loss is taken, -100 elsewhere (NOT shifted; the dataset shifts)
* ``attention_mask`` — per token, the 1-based index of the sample inside the row, 0 on padding. Attention
  must not cross a change of this value and position ids restart at each change (see
  ``mindspeed_dsv.data.datasets``).

Modes:

* ``rows_unpacked``: one sample per row, truncated to ``seq_length``; padding is added when read.
* ``Packer`` (``--pack``): samples are concatenated and cut every ``seq_length`` tokens; a sample may run on
  into the next row (its tail gets a new index there). The last row is padded.
* ``neat_pack`` (``--neat-pack``): greedy best-fit of whole samples into rows of ``seq_length`` (no sample is
  split), each row padded to ``seq_length``. Deterministic: ties keep input order.
"""

from __future__ import annotations

import bisect
from typing import Iterator, List, Sequence, Tuple

import numpy as np

from mindspeed_dsv.data.handlers import IGNORE_INDEX

Row = Tuple[np.ndarray, np.ndarray, np.ndarray]
Sample = Tuple[np.ndarray, np.ndarray]


def truncate(sample: Sample, seq_length: int | None) -> Tuple[Sample, bool]:
    ids, labels = sample
    if seq_length is None or len(ids) <= seq_length:
        return sample, False
    return (ids[:seq_length], labels[:seq_length]), True


def rows_unpacked(sample: Sample) -> Row:
    ids, labels = sample
    return ids, labels, np.ones(len(ids), dtype=np.int32)


def _pad_row(ids, labels, seg, seq_length, pad_id) -> Row:
    n = seq_length - len(ids)
    if n:
        ids = np.concatenate([ids, np.full(n, pad_id, np.int32)])
        labels = np.concatenate([labels, np.full(n, IGNORE_INDEX, np.int32)])
        seg = np.concatenate([seg, np.zeros(n, np.int32)])
    return ids.astype(np.int32), labels.astype(np.int32), seg.astype(np.int32)


class Packer:
    """Streaming ``--pack``: feed samples in order, collect full rows; ``finish`` pads the last one."""

    def __init__(self, seq_length: int, pad_id: int):
        self.seq_length = seq_length
        self.pad_id = pad_id
        self._ids: List[np.ndarray] = []
        self._labels: List[np.ndarray] = []
        self._segs: List[np.ndarray] = []
        self._fill = 0

    def add(self, sample: Sample) -> Iterator[Row]:
        ids, labels = sample
        pos = 0
        while pos < len(ids):
            take = min(self.seq_length - self._fill, len(ids) - pos)
            self._ids.append(ids[pos:pos + take])
            self._labels.append(labels[pos:pos + take])
            self._segs.append(np.full(take, len(self._segs) + 1, np.int32))
            self._fill += take
            pos += take
            if self._fill == self.seq_length:
                yield self._flush()

    def _flush(self) -> Row:
        row = _pad_row(np.concatenate(self._ids), np.concatenate(self._labels), np.concatenate(self._segs),
                       self.seq_length, self.pad_id)
        self._ids, self._labels, self._segs, self._fill = [], [], [], 0
        return row

    def finish(self) -> Iterator[Row]:
        if self._fill:
            yield self._flush()


def neat_pack(lengths: Sequence[int], seq_length: int) -> List[List[int]]:
    """Group sample indices into bins of total length <= seq_length without splitting any sample.

    Best-fit decreasing: longest samples first, each into the open bin with the least room that still
    fits it. Bins are returned in creation order, their members in input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    room_keys: List[Tuple[int, int]] = []  # sorted (room left, bin id)
    for i in order:
        n = lengths[i]
        if n > seq_length:
            raise ValueError(f"sample {i} has {n} tokens > --seq-length {seq_length}; truncate first")
        k = bisect.bisect_left(room_keys, (n, -1))
        if k < len(room_keys):
            room, b = room_keys.pop(k)
            bins[b].append(i)
            bisect.insort(room_keys, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(room_keys, (seq_length - n, len(bins) - 1))
    return [sorted(b) for b in bins]


def neat_rows(samples: Sequence[Sample], seq_length: int, pad_id: int) -> Iterator[Row]:
    for members in neat_pack([len(s[0]) for s in samples], seq_length):
        ids = np.concatenate([samples[i][0] for i in members])
        labels = np.concatenate([samples[i][1] for i in members])
        seg = np.concatenate([np.full(len(samples[i][0]), k + 1, np.int32) for k, i in enumerate(members)])
        yield _pad_row(ids, labels, seg, seq_length, pad_id)
