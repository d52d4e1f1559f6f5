"""Datasets and iterators for a run: ``build_data_iterators(data_cfg, ...)``."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from neox.data.blendable import (
    BlendableDataset,
    normalize_weights,
    samples_per_dataset,
    split_ranges,
    weights_by_num_docs,
)
from neox.data.gpt_dataset import GPTDataset
from neox.data.indexed_dataset import make_dataset
from neox.data.samplers import MegatronPretrainingSampler
from neox.errors import ConfigError, NeoXError

if TYPE_CHECKING:
    from neox.config.data import DataConfig

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


@dataclass
class DataIterators:
    """One iterator per split (``None`` for a split without data); each yields ``{"text": [mb, s + 1]}``."""

    train: Iterator[dict[str, torch.Tensor]] | None
    valid: Iterator[dict[str, torch.Tensor]] | None
    test: Iterator[dict[str, torch.Tensor]] | None


def split_num_samples(global_batch_size: int, train_iters: int, eval_interval: int, eval_iters: int) -> list[int]:
    """Samples each split must provide, as Megatron/NeoX count them."""
    train = train_iters * global_batch_size
    valid = (train_iters // max(eval_interval, 1) + 1) * eval_iters * global_batch_size
    test = eval_iters * global_batch_size
    return [train, valid, test]


def _open(prefix: str, data_cfg: DataConfig) -> Any:
    return make_dataset(prefix, data_cfg.data_impl, skip_warmup=not getattr(data_cfg, "mmap_warmup", False))


def _blend(name: str, prefixes: Sequence[str], weights: Sequence[float], num_samples: int, *, data_cfg: DataConfig,
           seq_length: int, seed: int, vocab_size: int | None = None) -> Any:
    """One split from weighted whole datasets (train/valid/test_data_paths)."""
    indexed = [_open(p, data_cfg) for p in prefixes]
    if getattr(data_cfg, "weight_by_num_documents", False):
        weights = weights_by_num_docs([len(d) for d in indexed], getattr(data_cfg, "weighted_sampler_alpha", 1.0))
    w = normalize_weights(weights, len(prefixes), key=f"{name}_data_weights")
    needed = samples_per_dataset(list(w), num_samples) if len(prefixes) > 1 else [num_samples]
    datasets = [
        GPTDataset(name, prefix, np.arange(len(ds)), ds, max(n, 1), seq_length, seed, vocab_size=vocab_size)
        for prefix, ds, n in zip(prefixes, indexed, needed)
    ]
    if len(datasets) == 1:
        return datasets[0]
    return BlendableDataset(datasets, list(w), num_samples)


def build_datasets(data_cfg: DataConfig, *, seq_length: int, seed: int, num_samples: Sequence[int],
                   vocab_size: int | None = None) -> list[Any]:
    """[train, valid, test] datasets (``None`` where a split has no data or needs no samples)."""
    out: list[Any] = [None, None, None]
    if data_cfg.train_data_paths:
        for i, name in enumerate(SPLITS):
            paths = getattr(data_cfg, f"{name}_data_paths")
            if paths and num_samples[i] > 0:
                out[i] = _blend(name, paths, getattr(data_cfg, f"{name}_data_weights"), num_samples[i],
                                data_cfg=data_cfg, seq_length=seq_length, seed=seed, vocab_size=vocab_size)
        return out
    if not data_cfg.data_path:
        raise ConfigError("data_path / train_data_paths: no training data configured; set one of them")
    indexed = _open(data_cfg.data_path, data_cfg)
    for i, (start, stop) in enumerate(split_ranges(data_cfg.split, len(indexed))):
        if stop > start and num_samples[i] > 0:
            out[i] = GPTDataset(SPLITS[i], data_cfg.data_path, np.arange(start, stop), indexed,
                                num_samples[i], seq_length, seed, vocab_size=vocab_size)
    if out[0] is None:
        raise ConfigError(f"split: {data_cfg.split!r} leaves no training documents in {data_cfg.data_path}")
    return out


def _loader(dataset: Any, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int,
            num_workers: int) -> Iterator[dict[str, torch.Tensor]]:
    sampler = MegatronPretrainingSampler(len(dataset), consumed, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
    return _OneLineErrors(iter(loader))


class _OneLineErrors:
    """Re-raise a NeoXError from a DataLoader worker with its own message, not the worker's traceback."""

    def __init__(self, it: Iterator[dict[str, torch.Tensor]]) -> None:
        self._it = it

    def __iter__(self) -> _OneLineErrors:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        try:
            return next(self._it)
        except NeoXError as err:
            text = str(err).strip()
            if not text.startswith("Caught "):
                raise
            last = text.splitlines()[-1]
            raise type(err)(last.split(f"{type(err).__name__}: ", 1)[-1]) from None


def build_data_iterators(data_cfg: DataConfig, *, seq_length: int, seed: int, micro_batch_size: int,
                         global_batch_size: int, dp_rank: int, dp_size: int, train_iters: int,
                         eval_interval: int, eval_iters: int, consumed_train_samples: int = 0,
                         consumed_valid_samples: int = 0, vocab_size: int | None = None) -> DataIterators:
    """Train/valid/test iterators for this data-parallel rank, resuming at the consumed counts.

    ``vocab_size``: token ids at or above it raise a DataError naming the file and document.
    """
    if global_batch_size % (micro_batch_size * dp_size):
        raise ConfigError(f"global batch {global_batch_size} is not a multiple of micro_batch {micro_batch_size} "
                          f"x data-parallel size {dp_size}")
    counts = split_num_samples(global_batch_size, train_iters, eval_interval, eval_iters)
    datasets = build_datasets(data_cfg, seq_length=seq_length, seed=seed, num_samples=counts, vocab_size=vocab_size)
    # Validation wraps around (evaluation re-reads its set); training past its samples is an error.
    valid_len = len(datasets[1]) if datasets[1] is not None else 1
    consumed = [consumed_train_samples, consumed_valid_samples % valid_len, 0]
    workers = getattr(data_cfg, "num_workers", 2)
    iters = [
        _loader(ds, c, micro_batch_size, dp_rank, dp_size, workers) if ds is not None else None
        for ds, c in zip(datasets, consumed)
    ]
    for name, ds, n in zip(SPLITS, datasets, counts):
        if ds is not None:
            logger.info("%s: %d samples of %d tokens (%d needed)", name, len(ds), seq_length + 1, n)
    return DataIterators(*iters)
