"""Mixtures: weights honoured (vs Megatron's greedy helper, ported here), split ranges, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from neox.config.data import DataConfig
from neox.data.blendable import (
    BlendableDataset,
    blending_indices,
    parse_split,
    split_ranges,
    weights_by_num_docs,
)
from neox.data.builder import build_datasets
from neox.errors import ConfigError
from tests.fixtures.data.corpus import make_corpus


def megatron_greedy(weights, size):
    """Port of Megatron's helpers.cpp build_blending_indices (the reference)."""
    current = np.zeros(len(weights), dtype=np.int64)
    index = np.zeros(size, dtype=np.int64)
    for s in range(size):
        t = max(float(s), 1.0)
        errors = [w * t - c for w, c in zip(weights, current)]
        i = int(np.argmax(errors))
        index[s] = i
        current[i] += 1
    return index


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3], [0.01, 0.99]])
def test_blend_tracks_weights_like_megatron(weights):
    size = 10_000
    w = np.asarray(weights) / np.sum(weights)
    ours, sample = blending_indices(w, size)
    ref = megatron_greedy(w, size)
    counts = np.bincount(ours, minlength=len(w))
    np.testing.assert_allclose(counts / size, w, rtol=0.01)
    # Every prefix stays as close to the targets as Megatron's greedy does (within one sample or two).
    ours_cum = np.stack([np.cumsum(ours == i) for i in range(len(w))])
    ref_cum = np.stack([np.cumsum(ref == i) for i in range(len(w))])
    assert np.abs(ours_cum - ref_cum).max() <= 2
    for i in range(len(w)):  # each dataset is read in order 0, 1, 2, ...
        np.testing.assert_array_equal(sample[ours == i], np.arange(counts[i]))
    again = blending_indices(w, size, window=613)  # merged a window at a time: the same sequence
    np.testing.assert_array_equal(again[0], ours)
    np.testing.assert_array_equal(again[1], sample)


def test_blendable_dataset_routes_items():
    a, b = [f"a{i}" for i in range(100)], [f"b{i}" for i in range(100)]
    bd = BlendableDataset([a, b], [3, 1], 40)
    items = [bd[i] for i in range(len(bd))]
    assert sum(x.startswith("a") for x in items) == 30
    assert [x for x in items if x.startswith("b")] == [f"b{i}" for i in range(10)]
    with pytest.raises(ValueError):
        BlendableDataset([a[:5], b], [3, 1], 40)


def test_blended_training_samples_match_weights(tmp_path):
    prefixes = []
    for k in range(3):
        p = str(tmp_path / f"d{k}")
        make_corpus(p, [50] * (20 + 10 * k))
        prefixes.append(p)
    seq = 4
    # The blend's provenance against the weights, and its samples against their source dataset.
    cfg = DataConfig(train_data_paths=prefixes, train_data_weights=[5, 3, 2], num_workers=0)
    train, valid, test = build_datasets(cfg, seq_length=seq, seed=1, num_samples=[10_000, 0, 0])
    assert valid is None and test is None and len(train) == 10_000
    counts = np.bincount(train.dataset_index, minlength=3) / 10_000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], rtol=0.01)
    for j in (0, 1, 2, 17, 9_999):
        d, s = int(train.dataset_index[j]), int(train.dataset_sample_index[j])
        np.testing.assert_array_equal(train[j]["text"], train.datasets[d][s]["text"])


def megatron_split(splits_string, size):
    """Port of Megatron's get_train_valid_test_split_ (the reference)."""
    splits = [float(s) for s in splits_string.split(",")]
    while len(splits) < 3:
        splits.append(0.0)
    splits = splits[:3]
    total = sum(splits)
    splits = [s / total for s in splits]
    idx = [0]
    for i, s in enumerate(splits):
        idx.append(idx[i] + int(round(s * float(size))))
    diff = idx[-1] - size
    for i in range(1, len(idx)):
        idx[i] -= diff
    return idx


@pytest.mark.parametrize("split", ["969, 30, 1", "949,50,1", "1,0,0", "8,2", "100"])
@pytest.mark.parametrize("size", [1, 7, 1000, 12345])
def test_split_ranges_match_megatron(split, size):
    idx = megatron_split(split, size)
    assert split_ranges(split, size) == [(idx[0], idx[1]), (idx[1], idx[2]), (idx[2], idx[3])]


def test_split_and_weight_errors():
    assert parse_split("969/30/1") == pytest.approx([0.969, 0.03, 0.001])
    with pytest.raises(ConfigError, match="split"):
        parse_split("a,b")
    with pytest.raises(ConfigError, match="split"):
        parse_split("0,0,0")
    with pytest.raises(ConfigError, match="2 weights for 3 datasets"):
        BlendableDataset([[1], [2], [3]], [1, 2], 3)
    # NeoX's formula: p ~ (n/N)**alpha, times (1 - n/N), normalised; with alpha 0 only the damping is left.
    assert weights_by_num_docs([60, 30, 10], alpha=0.0) == pytest.approx([0.4 / 2.0, 0.7 / 2.0, 0.9 / 2.0])
    assert weights_by_num_docs([7]) == [1.0]
