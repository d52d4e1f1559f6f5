"""Weighted mixtures of datasets, and the ``split`` string of a single ``data_path``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from neox.errors import ConfigError


def normalize_weights(weights: Sequence[float], n: int, key: str = "weights") -> np.ndarray:
    """``weights`` (empty: equal) as probabilities summing to 1."""
    if not weights:
        return np.full(n, 1.0 / n)
    if len(weights) != n:
        raise ConfigError(f"{key}: {len(weights)} weights for {n} datasets; give one weight per path")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ConfigError(f"{key}: weights must be finite, non-negative and not all zero, got {list(weights)}")
    return w / w.sum()


def weights_by_num_docs(num_docs: Sequence[int], alpha: float = 0.3) -> list[float]:
    """GPT-NeoX's ``weight_by_num_documents``: p_i ~ (n_i / N) ** alpha, damped by (1 - n_i / N)."""
    total = float(sum(num_docs))
    unbiased = [n / total for n in num_docs]
    probs = [p**alpha for p in unbiased]
    probs = [p / sum(probs) for p in probs]
    weights = [p * (1 - u) for p, u in zip(probs, unbiased)]
    return [w / sum(weights) for w in weights] if sum(weights) > 0 else probs


def _first_due(w: float, t: float) -> int:
    """Smallest k with (k + 1/2) / w >= t, using the very float keys the merge compares."""
    k = max(int(np.ceil(t * w - 0.5)), 0)
    while k > 0 and (k - 1 + 0.5) / w >= t:
        k -= 1
    while (k + 0.5) / w < t:
        k += 1
    return k


def blending_indices(weights: np.ndarray, size: int, window: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each sample, sample index within that dataset) for ``size`` samples.

    Like Megatron's greedy "serve the most under-served dataset" helper, the k-th sample of
    dataset i comes at time (k + 1/2) / w_i; merging those times (ties to the lower dataset)
    keeps every prefix within about one sample of its target counts. The merge is sorted one
    time window at a time, so memory stays small for tens of millions of samples.
    """
    weights = np.asarray(weights, dtype=np.float64)
    live = [i for i, w in enumerate(weights) if w > 0]
    dataset_index = np.empty(size, dtype=np.int16 if len(weights) < 2**15 else np.int64)
    sample_index = np.empty(size, dtype=np.int32 if size < 2**31 else np.int64)
    filled, t0 = 0, 0.0
    lo = {i: 0 for i in live}
    while filled < size:
        t1 = t0 + window / weights[live].sum()
        keys, owner, rank = [], [], []
        for i in live:
            hi = _first_due(weights[i], t1)
            k = np.arange(lo[i], hi, dtype=np.int64)
            keys.append((k + 0.5) / weights[i])
            owner.append(np.full(len(k), i, dtype=np.int64))
            rank.append(k)
            lo[i] = hi
        order = np.argsort(np.concatenate(keys), kind="stable")[: size - filled]
        n = len(order)
        dataset_index[filled:filled + n] = np.concatenate(owner)[order]
        sample_index[filled:filled + n] = np.concatenate(rank)[order]
        filled, t0 = filled + n, t1
    return dataset_index, sample_index


class BlendableDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``, deterministically."""

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], size: int) -> None:
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights, len(self.datasets))
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = blending_indices(self.weights, self.size)
        for i, ds in enumerate(self.datasets):
            used = self.dataset_sample_index[self.dataset_index == i]
            if used.size and int(used.max()) >= len(ds):
                raise ValueError(f"dataset {i} has {len(ds)} samples, the blend needs {int(used.max()) + 1}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Any:
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]


def samples_per_dataset(weights: Sequence[float], size: int) -> list[int]:
    """How many samples of each dataset a blend of ``size`` samples reads."""
    w = normalize_weights(weights, len(weights))
    dataset_index, _ = blending_indices(w, size)
    return np.bincount(dataset_index, minlength=len(w)).tolist()


def parse_split(split: str) -> list[float]:
    """``"969, 30, 1"`` (or ``969/30/1``) → three fractions summing to 1."""
    try:
        parts = [float(s) for s in split.replace("/", ",").split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"split: {split!r} is not comma-separated numbers like '969,30,1'") from None
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"split: {split!r} must be non-negative numbers, not all zero")
    return [p / sum(parts) for p in parts]


def split_ranges(split: str, size: int) -> list[tuple[int, int]]:
    """Megatron's document ranges ``[start, stop)`` of train/valid/test for ``size`` documents."""
    fractions = parse_split(split)
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * float(size))))
    diff = bounds[-1] - size
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]
