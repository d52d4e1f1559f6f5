"""Megatron / GPT-NeoX memory-mapped indexed datasets (``.bin`` + ``.idx``).

Byte layout of ``{prefix}.idx`` (little endian), as Megatron-LM and GPT-NeoX write it::

    b"MMIDIDX\\x00\\x00"                     9 bytes magic
    <Q version (= 1)                          8 bytes
    <B dtype code                             1 byte   (DTYPES below)
    <Q item count  n                          8 bytes
    <Q doc_idx count  d                       8 bytes
    int32[n]  sizes      (tokens per item)
    int64[n]  pointers   (byte offset of each item in the .bin)
    int64[d]  doc_idx    (item index where each document starts; last = n)

``{prefix}.bin`` is the items' tokens back to back in the dtype. Opening validates every field
against the file sizes, so a damaged file raises :class:`~neox.errors.DataError` naming the file
and the fault instead of returning garbage.
"""

from __future__ import annotations

import array
import os
import shutil
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from neox.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8

# Megatron-LM's table. Code 7 is float32 there, but fairseq-derived GPT-NeoX wrote np.double
# (8 bytes) under it; the reader tells the two apart by the pointers (see _resolve_code7).
DTYPES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def code(dtype: Any) -> int:
    """The on-disk dtype code of ``dtype``."""
    try:
        return _CODES[np.dtype(dtype)]
    except KeyError:
        raise DataError(f"dtype {np.dtype(dtype)} cannot be stored in an indexed dataset; "
                        f"expected one of {sorted(str(np.dtype(v)) for v in DTYPES.values())}") from None


def best_fitting_dtype(vocab_size: int | None = None) -> type[np.generic]:
    """uint16 when every token id fits (vocabulary under 65500, as NeoX), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


class _Index:
    """The parsed, validated ``.idx`` file; arrays are read-only views of an mmap."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise DataError(f"{path}: index file not found (expected the .idx of a .bin/.idx pair)")
        file_size = os.path.getsize(path)
        if file_size < HEADER_SIZE:
            raise DataError(f"{path}: truncated index: {file_size} bytes, the header alone is {HEADER_SIZE}")
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:9] != MAGIC:
            raise DataError(f"{path}: not an mmap indexed dataset index: magic {header[:9]!r}, expected {MAGIC!r}")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise DataError(f"{path}: unsupported index version {version}, expected {VERSION}")
        (self.dtype_code,) = struct.unpack("<B", header[17:18])
        if self.dtype_code not in DTYPES:
            raise DataError(f"{path}: unknown dtype code {self.dtype_code}, expected one of {sorted(DTYPES)}")
        self.len, self.doc_count = struct.unpack("<QQ", header[18:34])
        expected = HEADER_SIZE + self.len * 12 + self.doc_count * 8
        # Megatron-LM's multimodal variant appends one int8 mode per item; accept and ignore it.
        if file_size != expected and file_size != expected + self.len:
            fault = "truncated index" if file_size < expected else "unexpected trailing bytes in index"
            raise DataError(f"{path}: {fault}: {file_size} bytes, but {self.len} items and "
                            f"{self.doc_count} doc_idx entries need {expected}")
        self._mmap = np.memmap(path, mode="r", order="C")
        buf = memoryview(self._mmap)
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=self.len, offset=HEADER_SIZE)
        self.pointers = np.frombuffer(buf, dtype=np.int64, count=self.len, offset=HEADER_SIZE + 4 * self.len)
        self.doc_idx = np.frombuffer(buf, dtype=np.int64, count=self.doc_count, offset=HEADER_SIZE + 12 * self.len)
        self.dtype = np.dtype(DTYPES[self.dtype_code])
        if self.dtype_code == 7:
            self.dtype = self._resolve_code7()
        self._check_arrays()

    def _resolve_code7(self) -> np.dtype:
        if self.len > 1 and self.sizes[0] > 0 and self.pointers[1] == 8 * int(self.sizes[0]):
            return np.dtype(np.float64)
        return np.dtype(np.float32)

    def _check_arrays(self) -> None:
        n, item = self.len, self.dtype.itemsize
        if n and int(self.sizes.min()) < 0:
            raise DataError(f"{self.path}: corrupt index: negative item size {int(self.sizes.min())}")
        if n and int(self.pointers[0]) != 0:
            raise DataError(f"{self.path}: corrupt index: first pointer is {int(self.pointers[0])}, expected 0")
        step = 1 << 24  # chunked so a 1e9-item index doesn't allocate gigabytes here
        for lo in range(0, max(n - 1, 0), step):
            hi = min(lo + step, n - 1)
            gaps = np.diff(self.pointers[lo:hi + 1])
            bad = np.nonzero(gaps != self.sizes[lo:hi].astype(np.int64) * item)[0]
            if bad.size:
                i = lo + int(bad[0])
                raise DataError(f"{self.path}: corrupt index: pointer of item {i + 1} disagrees with "
                                f"size {int(self.sizes[i])} x {item} bytes after item {i}")
        if self.doc_count:
            d = self.doc_idx
            if int(d[0]) < 0 or int(d[-1]) > n or (self.doc_count > 1 and bool((np.diff(d) < 0).any())):
                raise DataError(f"{self.path}: corrupt index: doc_idx must be non-decreasing within [0, {n}]")

    @property
    def data_bytes(self) -> int:
        """Bytes the ``.bin`` must hold."""
        if self.len == 0:
            return 0
        return int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize

    def close(self) -> None:
        mm = getattr(self, "_mmap", None)
        if mm is not None and getattr(mm, "_mmap", None) is not None:
            mm._mmap.close()


def _warmup(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


class MMapIndexedDataset(torch.utils.data.Dataset):
    """Read-only view of a ``{prefix}.bin/.idx`` pair; items are numpy arrays of token ids.

    Pickles by path, so DataLoader workers reopen the mmap instead of copying it.
    """

    def __init__(self, path: str, skip_warmup: bool = True) -> None:
        super().__init__()
        self._do_init(path, skip_warmup)

    def _do_init(self, path: str, skip_warmup: bool) -> None:
        self._path = path
        self._index = _Index(index_file_path(path))
        bin_path = data_file_path(path)
        if not os.path.isfile(bin_path):
            raise DataError(f"{bin_path}: data file not found (expected beside {index_file_path(path)})")
        actual, needed = os.path.getsize(bin_path), self._index.data_bytes
        if actual != needed:
            raise DataError(f"{bin_path}: data file is {actual} bytes but its index's sizes and pointers "
                            f"need {needed} ({'truncated' if actual < needed else 'trailing bytes'})")
        if not skip_warmup:
            _warmup(index_file_path(path))
            _warmup(bin_path)
        # np.memmap refuses zero-length files; an empty dataset just has no buffer.
        self._bin_mmap = np.memmap(bin_path, mode="r", order="C") if actual else None
        self._bin = memoryview(self._bin_mmap) if actual else memoryview(b"")

    def __getstate__(self) -> str:
        return self._path

    def __setstate__(self, state: str) -> None:
        self._do_init(state, skip_warmup=True)

    def __len__(self) -> int:
        return self._index.len

    def __getitem__(self, idx: int | slice) -> Any:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices into an indexed dataset must be contiguous")
            if stop <= start:
                return []
            sizes = self._index.sizes[start:stop]
            flat = np.frombuffer(self._bin, dtype=self.dtype, count=int(sizes.sum()),
                                 offset=int(self._index.pointers[start]))
            return np.split(flat, np.cumsum(sizes)[:-1])
        i = int(idx)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} items in {self._path}")
        return np.frombuffer(self._bin, dtype=self.dtype, count=int(self._index.sizes[i]),
                             offset=int(self._index.pointers[i]))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of item ``idx`` (to its end when length is None)."""
        size = int(self._index.sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"get({idx}, offset={offset}, length={length}) outside item of {size} tokens")
        ptr = int(self._index.pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=ptr)

    @property
    def sizes(self) -> np.ndarray:
        return self._index.sizes

    @property
    def doc_idx(self) -> np.ndarray:
        return self._index.doc_idx

    @property
    def dtype(self) -> np.dtype:
        return self._index.dtype

    @property
    def path(self) -> str:
        return self._path

    @property
    def supports_prefetch(self) -> bool:
        return False

    def num_tokens(self, index: int) -> int:
        return int(self._index.sizes[index])

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.isfile(index_file_path(path)) and os.path.isfile(data_file_path(path))


class MMapIndexedDatasetBuilder:
    """Writes ``out_file`` (the ``.bin``) item by item; ``finalize(index_file)`` writes the ``.idx``.

    Both files are written under a temporary name and renamed into place, so a crash never
    leaves a half-written pair that looks valid.
    """

    def __init__(self, out_file: str, dtype: Any = np.int64) -> None:
        self._dtype = np.dtype(dtype)
        code(self._dtype)
        self._out_file = out_file
        self._tmp_file = out_file + f".tmp{os.getpid()}"
        self._data_file = open(self._tmp_file, "wb")
        self._sizes = array.array("q")
        self._doc_idx = array.array("q", [0])
        info = np.iinfo(self._dtype) if self._dtype.kind in "iu" else None
        self._bounds = (int(info.min), int(info.max)) if info is not None else None

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def add_item(self, tensor: Any) -> None:
        """Append one item (a torch tensor, numpy array or list of ids)."""
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.detach().cpu().numpy()
        src = np.asarray(tensor)
        if self._bounds is not None and src.size:
            lo, hi = int(src.min()), int(src.max())
            if lo < self._bounds[0] or hi > self._bounds[1]:
                raise DataError(f"{self._out_file}: token ids [{lo}, {hi}] do not fit dtype {self._dtype}; "
                                "write with a wider dtype (int32) for this vocabulary")
        arr = np.ascontiguousarray(src.reshape(-1), dtype=self._dtype)
        if arr.size > np.iinfo(np.int32).max:
            raise DataError(f"{self._out_file}: item of {arr.size} tokens exceeds the int32 size field")
        self._data_file.write(arr.tobytes(order="C"))
        self._sizes.append(arr.size)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def merge_file_(self, another_file: str) -> None:
        """Append the items and documents of the dataset at prefix ``another_file``."""
        index = _Index(index_file_path(another_file))
        if index.dtype != self._dtype:
            raise DataError(f"{index_file_path(another_file)}: dtype {index.dtype} differs from the "
                            f"builder's {self._dtype}; merge datasets of one dtype")
        offset = len(self._sizes)
        self._sizes.extend(index.sizes.astype(np.int64).tolist())
        docs = index.doc_idx.astype(np.int64) + offset
        # Each input's doc_idx starts with its own 0, which is our current end: skip the repeat.
        start = 1 if len(docs) and docs[0] == self._doc_idx[-1] else 0
        self._doc_idx.extend(docs[start:].tolist())
        with open(data_file_path(another_file), "rb") as f:
            shutil.copyfileobj(f, self._data_file, 16 << 20)
        index.close()

    def discard(self) -> None:
        """Abandon the output (after an error): close and delete the partial ``.bin``."""
        self._data_file.close()
        if os.path.exists(self._tmp_file):
            os.remove(self._tmp_file)

    def finalize(self, index_file: str) -> None:
        """Close the ``.bin`` and write ``index_file``."""
        self._data_file.close()
        os.replace(self._tmp_file, self._out_file)
        write_index(index_file, self._dtype, np.frombuffer(self._sizes, dtype=np.int64),
                    np.frombuffer(self._doc_idx, dtype=np.int64))


def write_index(index_file: str, dtype: Any, sizes: Sequence[int] | np.ndarray,
                doc_idx: Sequence[int] | np.ndarray) -> None:
    """Write an ``.idx`` for items of ``sizes`` tokens stored back to back (atomic rename)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    tmp = index_file + f".tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", code(dtype)))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.astype(np.int32).tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(doc_idx, dtype=np.int64).tobytes(order="C"))
    os.replace(tmp, index_file)


def make_builder(out_file: str, impl: str = "mmap", vocab_size: int | None = None) -> MMapIndexedDatasetBuilder:
    """NeoX's factory: a builder with the best dtype for ``vocab_size``."""
    if impl not in ("mmap", "infer"):
        raise DataError(f"data_impl {impl!r}: only 'mmap' datasets can be written")
    return MMapIndexedDatasetBuilder(out_file, dtype=best_fitting_dtype(vocab_size))


def make_dataset(path: str, impl: str = "mmap", skip_warmup: bool = True) -> MMapIndexedDataset:
    """Open the dataset at prefix ``path``; every implementation name reads the mmap format."""
    if not MMapIndexedDataset.exists(path):
        raise DataError(f"{path}: dataset not found: expected {index_file_path(path)} and {data_file_path(path)} "
                        "(the path is the prefix without .bin/.idx)")
    return MMapIndexedDataset(path, skip_warmup=skip_warmup)
