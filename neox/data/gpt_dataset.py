"""GPT pretraining samples: ``seq_length + 1`` tokens that run across document boundaries.

Megatron / GPT-NeoX index semantics, built with vectorised numpy (no C++ helper to compile):

* ``doc_idx``: the order documents are read in: one shuffled permutation per epoch, as many
  epochs as ``num_samples`` need.
* ``sample_idx`` ``[n + 1, 2]``: (position in doc_idx, token offset) where sample ``i`` starts;
  sample ``i`` is the stream's tokens ``[i * seq_length, (i + 1) * seq_length]`` (inclusive), so
  consecutive samples share one token (the last label is the next sample's first input).
* ``shuffle_idx``: sample order, shuffled within each epoch (a sample belongs to the epoch it starts
  in), so one epoch's worth of samples reads every token of the corpus once.

The three arrays are cached as ``.npy`` beside the data, under names keyed by a hash of everything
they depend on (seed, seq_length, num_samples, the documents and their sizes), built by whichever
process first takes a file lock, and memory-mapped by every other process and later run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from neox.data.indexed_dataset import MMapIndexedDataset
from neox.errors import DataError

logger = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when the index construction changes, so old caches are not reused


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose token stream yields ``num_samples`` samples."""
    if tokens_per_epoch <= 1:
        raise DataError(f"dataset has {tokens_per_epoch} tokens; at least 2 are needed to form a sample")
    needed_tokens = num_samples * seq_length + 1
    return max(1, -(-needed_tokens // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """Each epoch's documents in a fresh random order, epochs back to back."""
    documents = np.asarray(documents, dtype=np.int64)
    out = np.empty(num_epochs * len(documents), dtype=np.int64)
    for e in range(num_epochs):
        out[e * len(documents):(e + 1) * len(documents)] = documents[rng.permutation(len(documents))]
    return out


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_epochs: int,
                     tokens_per_epoch: int) -> np.ndarray:
    """``[n + 1, 2]`` (doc_idx position, offset) of every sample boundary; Megatron's helper, vectorised."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    lengths = sizes[doc_idx].astype(np.int64)
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # 'right' - 1 picks the last document starting at or before the position, which skips
    # empty documents sharing that start.
    doc = np.searchsorted(starts, positions, side="right") - 1
    sample_idx = np.empty((num_samples + 1, 2), dtype=np.int64)
    sample_idx[:, 0] = doc
    sample_idx[:, 1] = positions - starts[doc]
    return sample_idx


def build_shuffle_idx(num_samples: int, seq_length: int, tokens_per_epoch: int,
                      rng: np.random.RandomState) -> np.ndarray:
    """A permutation of ``range(num_samples)`` that shuffles each epoch's samples among themselves."""
    out = np.arange(num_samples, dtype=np.int64)
    bound, epoch = 0, 1
    while bound < num_samples:
        nxt = min(num_samples, -(-(epoch * tokens_per_epoch) // seq_length))
        rng.shuffle(out[bound:nxt])
        bound, epoch = nxt, epoch + 1
    return out


def build_index_mappings(documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int,
                         seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) for ``num_samples`` samples, uncached."""
    tokens_per_epoch = int(sizes[documents].astype(np.int64).sum())
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed % (2**32))
    doc_idx = build_doc_idx(documents, num_epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    shuffle_idx = build_shuffle_idx(len(sample_idx) - 1, seq_length, tokens_per_epoch, rng)
    return doc_idx, sample_idx, shuffle_idx


def cache_key(name: str, documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int,
              seed: int) -> str:
    """Hash of everything the index arrays depend on."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": INDEX_VERSION, "name": name, "num_samples": int(num_samples),
                         "seq_length": int(seq_length), "seed": int(seed), "num_docs": int(len(documents))}).encode())
    h.update(np.ascontiguousarray(documents, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(sizes[documents], dtype=np.int32).tobytes())
    return h.hexdigest()[:16]


def _cache_dir(data_prefix: str, cache_dir: str | None) -> str:
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        return cache_dir
    here = os.path.dirname(os.path.abspath(data_prefix))
    if os.access(here, os.W_OK):
        return here
    # A read-only data folder: fall back to a per-machine cache rather than failing.
    fallback = os.path.join(tempfile.gettempdir(), "neox_index_cache")
    os.makedirs(fallback, exist_ok=True)
    return fallback


def _save_atomic(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, path)


def _build_and_save(name: str, documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int,
                    seed: int, paths: list[str], stem: str) -> None:
    start = time.perf_counter()
    arrays = build_index_mappings(documents, sizes, num_samples, seq_length, seed)
    for path, arr in zip(paths, arrays):
        _save_atomic(path, arr)
    logger.info("built %s index mappings (%d samples) in %.2f s: %s_*", name, len(arrays[2]),
                time.perf_counter() - start, stem)


def cached_index_mappings(name: str, data_prefix: str, documents: np.ndarray, sizes: np.ndarray,
                          num_samples: int, seq_length: int, seed: int,
                          cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The index arrays, read from the cache or built once under a file lock and cached."""
    key = cache_key(name, documents, sizes, num_samples, seq_length, seed)
    base = os.path.join(_cache_dir(data_prefix, cache_dir), os.path.basename(data_prefix))
    stem = f"{base}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s_{key}"
    paths = [f"{stem}_{part}_idx.npy" for part in ("doc", "sample", "shuffle")]
    with open(stem + ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            # Some network filesystems refuse flock. The build is deterministic and each file is
            # renamed into place whole, so concurrent builders only duplicate work.
            logger.warning("no file lock on %s.lock; building without one", stem)
        try:
            if not all(os.path.isfile(p) for p in paths):
                _build_and_save(name, documents, sizes, num_samples, seq_length, seed, paths, stem)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)
    try:
        doc_idx, sample_idx, shuffle_idx = (np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
    except (OSError, ValueError) as err:
        raise DataError(f"{stem}_*_idx.npy: unreadable index cache ({err}); delete these files to rebuild") from None
    return doc_idx, sample_idx, shuffle_idx


class GPTDataset(torch.utils.data.Dataset):
    """Samples ``{"text": int64[seq_length + 1]}`` over ``documents`` of ``indexed_dataset``."""

    def __init__(self, name: str, data_prefix: str, documents: np.ndarray, indexed_dataset: MMapIndexedDataset,
                 num_samples: int, seq_length: int, seed: int, cache_dir: str | None = None,
                 vocab_size: int | None = None) -> None:
        self.name, self.seq_length = name, seq_length
        self.indexed_dataset = indexed_dataset
        self.vocab_size = vocab_size  # token ids must stay below it (checked per sample: ~1 us)
        documents = np.asarray(documents, dtype=np.int64)
        if len(documents) == 0:
            raise DataError(f"{data_prefix}: the {name} split has no documents")
        if documents.min() < 0 or documents.max() >= len(indexed_dataset):
            raise DataError(f"{data_prefix}: {name} documents outside [0, {len(indexed_dataset)})")
        self.doc_idx, self.sample_idx, self.shuffle_idx = cached_index_mappings(
            name, data_prefix, documents, indexed_dataset.sizes, num_samples, seq_length, seed, cache_dir)

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i = int(self.shuffle_idx[idx])
        doc_f, off_f = (int(x) for x in self.sample_idx[i])
        doc_l, off_l = (int(x) for x in self.sample_idx[i + 1])
        ds = self.indexed_dataset
        if doc_f == doc_l:
            tokens = ds.get(int(self.doc_idx[doc_f]), offset=off_f, length=off_l - off_f + 1)
        else:
            parts = [ds.get(int(self.doc_idx[doc_f]), offset=off_f)]
            parts += [ds.get(int(self.doc_idx[d])) for d in range(doc_f + 1, doc_l)]
            parts.append(ds.get(int(self.doc_idx[doc_l]), length=off_l + 1))
            tokens = np.concatenate(parts)
        if self.vocab_size is not None and len(tokens) and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            self._bad_token(doc_f, doc_l)
        return {"text": np.asarray(tokens, dtype=np.int64)}

    def _bad_token(self, doc_f: int, doc_l: int) -> None:
        """Raise a DataError naming the file and the first document of the sample with an id out of range."""
        ds = self.indexed_dataset
        for d in range(doc_f, doc_l + 1):
            doc = int(self.doc_idx[d])
            ids = ds.get(doc)
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            if bad.size:
                raise DataError(f"{ds.path}.bin: document {doc} holds token id {int(bad[0])}, outside the model's "
                                f"vocabulary [0, {self.vocab_size}); was it tokenized with another tokenizer?")
