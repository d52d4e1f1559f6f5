"""The mmap .bin/.idx format, checked against a writer and a reader written here from the spec.

Spec (Megatron-LM megatron/core/datasets/indexed_dataset.py, GPT-NeoX megatron/data/indexed_dataset.py):
idx = b"MMIDIDX\\x00\\x00", <Q 1, <B dtype code, <Q n items, <Q n doc_idx,
int32 sizes[n], int64 pointers[n] (byte offsets), int64 doc_idx[d]; bin = the items back to back.
"""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from neox.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder, make_dataset
from neox.errors import DataError
from tests.fixtures.data.mmap_spec import SPEC_CODES, spec_read, spec_write

ITEMS = [[1, 2, 3], [4], [], [5, 6, 7, 8, 9], [10, 11]]


@pytest.mark.parametrize("code", sorted(SPEC_CODES))
def test_reads_spec_written_files_of_every_dtype(tmp_path, code):
    prefix = str(tmp_path / "d")
    spec_write(prefix, ITEMS, [0, 2, 4, 5], code)
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.dtype(SPEC_CODES[code])
    assert len(ds) == 5
    assert ds.sizes.tolist() == [3, 1, 0, 5, 2]
    assert ds.doc_idx.tolist() == [0, 2, 4, 5]
    assert [ds[i].tolist() for i in range(5)] == ITEMS
    assert [a.tolist() for a in ds[1:4]] == ITEMS[1:4]
    assert ds.get(3, offset=1, length=3).tolist() == [6, 7, 8]
    assert ds.get(3, offset=2).tolist() == [7, 8, 9]
    assert ds[-1].tolist() == [10, 11]


def test_neox_double_under_code_7_is_detected(tmp_path):
    # GPT-NeoX's table wrote np.double (8 bytes) under code 7, where Megatron-LM has float32.
    prefix = str(tmp_path / "d")
    spec_write(prefix, [[1.5, 2.5], [3.5]], [0, 2], 7, item_dtype=np.float64)
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.float64
    assert ds[1].tolist() == [3.5]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_builder_output_matches_spec_reader(tmp_path, dtype):
    prefix = str(tmp_path / "b")
    b = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    b.add_item(torch.tensor([1, 2, 3]))
    b.add_item(np.array([4, 5]))
    b.end_document()
    b.add_item([6])
    b.end_document()
    b.finalize(prefix + ".idx")
    version, code, sizes, doc_idx, items = spec_read(prefix)
    assert version == 1 and SPEC_CODES[code] == dtype
    assert sizes == [3, 2, 1] and doc_idx == [0, 2, 3]
    assert items == [[1, 2, 3], [4, 5], [6]]


def test_merge_and_pickle(tmp_path):
    a, c, out = str(tmp_path / "a"), str(tmp_path / "c"), str(tmp_path / "m")
    spec_write(a, [[1, 2], [3]], [0, 1, 2], 8)
    spec_write(c, [[4], [5, 6, 7]], [0, 2], 8)
    b = MMapIndexedDatasetBuilder(out + ".bin", dtype=np.uint16)
    b.merge_file_(a)
    b.merge_file_(c)
    b.finalize(out + ".idx")
    _, _, sizes, doc_idx, items = spec_read(out)
    assert items == [[1, 2], [3], [4], [5, 6, 7]]
    assert doc_idx == [0, 1, 2, 4]
    ds = pickle.loads(pickle.dumps(make_dataset(out)))
    assert ds[3].tolist() == [5, 6, 7]


def test_builder_rejects_ids_outside_dtype(tmp_path):
    b = MMapIndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
    with pytest.raises(DataError, match="do not fit dtype uint16"):
        b.add_item([70000])


def _corrupt(tmp_path, how):
    prefix = str(tmp_path / "c")
    spec_write(prefix, ITEMS, [0, 5], 4)
    idx = bytearray(open(prefix + ".idx", "rb").read())
    if how == "magic":
        idx[:9] = b"TNTIDX\x00\x00\x00"
    elif how == "version":
        idx[9:17] = struct.pack("<Q", 2)
    elif how == "dtype":
        idx[17] = 9
    elif how == "truncated_header":
        idx = idx[:20]
    elif how == "truncated_index":
        idx = idx[:-5]
    elif how == "trailing_index":
        idx += b"\x00" * 3
    elif how == "pointer":
        struct.pack_into("<q", idx, 34 + 4 * 5 + 8 * 2, 999)
    elif how == "negative_size":
        struct.pack_into("<i", idx, 34, -1)
    elif how == "doc_idx":
        struct.pack_into("<q", idx, 34 + 12 * 5 + 8, 77)
    open(prefix + ".idx", "wb").write(bytes(idx))
    if how == "bin_short":
        data = open(prefix + ".bin", "rb").read()
        open(prefix + ".bin", "wb").write(data[:-4])
    elif how == "bin_long":
        open(prefix + ".bin", "ab").write(b"\x00" * 4)
    return prefix


@pytest.mark.parametrize("how, message", [
    ("magic", "magic"),
    ("version", "unsupported index version 2"),
    ("dtype", "unknown dtype code 9"),
    ("truncated_header", "truncated index"),
    ("truncated_index", "truncated index"),
    ("trailing_index", "trailing bytes"),
    ("pointer", "pointer of item 2 disagrees"),
    ("negative_size", "negative item size"),
    ("doc_idx", "doc_idx"),
    ("bin_short", "truncated"),
    ("bin_long", "trailing bytes"),
])
def test_corrupt_files_raise_data_error_naming_the_file(tmp_path, how, message):
    prefix = _corrupt(tmp_path, how)
    with pytest.raises(DataError, match=message) as info:
        MMapIndexedDataset(prefix)
    assert str(tmp_path) in str(info.value)


def test_missing_files(tmp_path):
    prefix = str(tmp_path / "m")
    with pytest.raises(DataError, match="dataset not found"):
        make_dataset(prefix)
    spec_write(prefix, ITEMS, [0, 5], 4)
    (tmp_path / "m.bin").unlink()
    with pytest.raises(DataError, match="data file not found"):
        MMapIndexedDataset(prefix)
