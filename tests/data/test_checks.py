"""mindspeed_dsv.data.checks: each bad input is named with the file and what is wrong, against datasets built
here with megatron's own writer (so the expected sizes and positions are known independently)."""

import os
import shutil

import numpy as np
import pytest

from mindspeed_dsv.data.checks import (
    InputError,
    check_data_kind,
    check_indexed_dataset,
    check_tokenizer_dir,
    find_out_of_vocab,
)
from tests.data.conftest import TOKENIZER


def _write(prefix, docs, dtype=np.int32):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(np.asarray(d, dtype=dtype), [len(d)])
    b.finalize(prefix + ".idx")
    return prefix


def test_whole_dataset_passes_and_counts(tmp_path):
    p = _write(str(tmp_path / "a"), [[1, 2, 3], [4, 5], [6]])
    assert check_indexed_dataset(p) == 3


@pytest.mark.parametrize("ext", ["bin", "idx"])
def test_truncated_file_is_named(tmp_path, ext):
    p = _write(str(tmp_path / "a"), [list(range(100)), list(range(50))])
    full = os.path.getsize(f"{p}.bin")
    assert full == 150 * 4  # int32 tokens: what the .idx promises
    os.truncate(f"{p}.{ext}", os.path.getsize(f"{p}.{ext}") - 3)
    with pytest.raises(InputError, match=rf"{p}\.{ext}: truncated"):
        check_indexed_dataset(p)
    if ext == "bin":
        with pytest.raises(InputError, match=f"{full - 3} bytes; {p}.idx needs {full}"):
            check_indexed_dataset(p)


def test_missing_and_empty(tmp_path):
    with pytest.raises(InputError, match="b.bin and .*b.idx not found"):
        check_indexed_dataset(str(tmp_path / "b"))
    p = _write(str(tmp_path / "e"), [])
    with pytest.raises(InputError, match="holds no sequences"):
        check_indexed_dataset(p)


def test_data_kind(tmp_path):
    pt = _write(str(tmp_path / "pt_text_document"), [[1, 2]])
    sft = str(tmp_path / "sft")
    for k in ("input_ids", "labels", "attention_mask"):
        _write(f"{sft}_packed_{k}_document", [[1, 2]])
    assert check_data_kind([pt], instruction=False) == [pt]
    assert check_data_kind([sft], instruction=True) == [f"{sft}_packed_{k}_document"
                                                        for k in ("input_ids", "labels", "attention_mask")]
    with pytest.raises(InputError, match="this is instruction data .*posttrain_gpt.py"):
        check_data_kind([sft], instruction=False)
    with pytest.raises(InputError, match="this is instruction data"):
        check_data_kind([f"{sft}_packed_input_ids_document"], instruction=False)
    with pytest.raises(InputError, match="this is pretraining data"):
        check_data_kind([pt], instruction=True)
    os.remove(f"{sft}_packed_labels_document.idx")
    with pytest.raises(InputError, match="sft_packed_labels_document.bin/.idx not found .*incomplete"):
        check_data_kind([sft], instruction=True)


def test_out_of_vocab_position(tmp_path):
    docs = [[1, 2, 3], [4, 5, 6, 7], [8, 4096, 9]]
    p = _write(str(tmp_path / "v"), docs, dtype=np.uint16)
    assert find_out_of_vocab(p, 4096) == (2, 1, 4096)
    assert find_out_of_vocab(p, 4097) is None
    assert find_out_of_vocab(p, 7, chunk=2) == (1, 3, 7)  # found across chunk boundaries


def test_tokenizer_dir(tmp_path):
    check_tokenizer_dir(TOKENIZER)
    with pytest.raises(InputError, match="--tokenizer-name-or-path .*nope: the tokenizer directory does not exist"):
        check_tokenizer_dir(str(tmp_path / "nope"))
    d = tmp_path / "tok"
    shutil.copytree(TOKENIZER, d)
    data = (d / "tokenizer.json").read_bytes()
    (d / "tokenizer.json").write_bytes(data[:1000])
    with pytest.raises(InputError, match=r"tokenizer.json: not valid JSON .*1000 bytes.*truncated"):
        check_tokenizer_dir(str(d))
