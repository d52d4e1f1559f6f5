"""GPT samples: index construction vs Megatron's C++ helper (ported here), epoch coverage, caching."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

import neox.data.gpt_dataset as gd
from neox.data.indexed_dataset import MMapIndexedDataset
from tests.fixtures.data.corpus import make_corpus


def megatron_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """Line-by-line port of Megatron's helpers.cpp build_sample_idx (the reference)."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    sample_index, doc_idx_index, doc_offset = 1, 0, 0
    while sample_index <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = int(sizes[doc_idx[doc_idx_index]]) - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        out[sample_index] = (doc_idx_index, doc_offset)
        sample_index += 1
    return out


@pytest.mark.parametrize("seq_length", [1, 7, 16, 64])
def test_sample_idx_matches_megatron_helper(seq_length):
    rng = np.random.RandomState(0)
    sizes = rng.randint(1, 40, size=50).astype(np.int32)
    for epochs in (1, 3):
        doc_idx = gd.build_doc_idx(np.arange(50), epochs, rng)
        tpe = int(sizes.sum())
        ours = gd.build_sample_idx(sizes, doc_idx, seq_length, epochs, tpe)
        np.testing.assert_array_equal(ours, megatron_sample_idx(sizes, doc_idx, seq_length, epochs, tpe))


def test_samples_are_the_document_stream_cut_every_seq_length(tmp_path):
    sizes = [5, 0, 17, 3, 0, 0, 30, 1, 9, 12]  # empty documents included
    ds = make_corpus(str(tmp_path / "c"), sizes)
    seq = 8
    g = gd.GPTDataset("train", str(tmp_path / "c"), np.arange(len(sizes)), ds, 25, seq, seed=3)
    stream = np.concatenate([ds[int(d)] for d in g.doc_idx])
    assert len(g) >= 25
    for j in range(len(g)):
        i = int(g.shuffle_idx[j])
        sample = g[j]["text"]
        assert sample.dtype == np.int64 and sample.shape == (seq + 1,)
        np.testing.assert_array_equal(sample, stream[i * seq:i * seq + seq + 1])


def test_one_epoch_reads_every_token_once(tmp_path):
    rng = np.random.RandomState(1)
    sizes = rng.randint(1, 60, size=40)
    ds = make_corpus(str(tmp_path / "c"), sizes)
    total, seq = int(sizes.sum()), 16
    g = gd.GPTDataset("train", str(tmp_path / "c"), np.arange(40), ds, (total - 1) // seq, seq, seed=5)
    seen = np.concatenate([g[j]["text"][:-1] for j in range(len(g))])
    assert len(np.unique(seen)) == len(seen) == len(g) * seq  # nothing read twice
    assert total - len(seen) <= seq  # everything read but the last partial sample
    assert not np.array_equal(g.shuffle_idx, np.arange(len(g)))  # and in shuffled order


def test_several_epochs_each_a_permutation(tmp_path):
    sizes = np.full(10, 13)
    ds = make_corpus(str(tmp_path / "c"), sizes)
    seq = 10
    g = gd.GPTDataset("train", str(tmp_path / "c"), np.arange(10), ds, 40, seq, seed=7)
    epochs = len(g.doc_idx) // 10
    assert epochs == 4  # 130 tokens an epoch; 40 samples of 10 need 401
    for e in range(epochs):
        assert sorted(g.doc_idx[e * 10:(e + 1) * 10]) == list(range(10))
    bounds = [min(len(g), -(-(e * 130) // seq)) for e in range(epochs + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        assert sorted(g.shuffle_idx[lo:hi]) == list(range(lo, hi))


def test_index_cache_reused_and_invalidated(tmp_path, monkeypatch):
    prefix = str(tmp_path / "c")
    ds = make_corpus(prefix, [11, 7, 20, 5, 9])
    calls = []
    real = gd.build_index_mappings

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(gd, "build_index_mappings", counting)
    docs = np.arange(5)
    first = gd.GPTDataset("train", prefix, docs, ds, 10, 4, seed=1)
    again = gd.GPTDataset("train", prefix, docs, ds, 10, 4, seed=1)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.shuffle_idx, again.shuffle_idx)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".npy")]) == 3
    for n, change in enumerate(({"seed": 2}, {"seq_length": 5}, {"num_samples": 11}), start=2):
        kw = {"num_samples": 10, "seq_length": 4, "seed": 1} | change
        other = gd.GPTDataset("train", prefix, docs, ds, **kw)
        assert len(calls) == n and calls[-1][2:] == (kw["num_samples"], kw["seq_length"], kw["seed"])
        assert len([f for f in os.listdir(tmp_path) if f.endswith(".npy")]) == 3 * n
        if "seed" in change:
            assert not np.array_equal(other.shuffle_idx, first.shuffle_idx)
    assert len(calls) == 4
    gd.GPTDataset("valid", prefix, docs[:3], ds, 10, 4, seed=1)  # other documents: another cache
    assert len(calls) == 5
    ds2 = make_corpus(prefix, [11, 7, 21, 5, 9])  # same name, data rewritten: not reused
    gd.GPTDataset("train", prefix, docs, ds2, 10, 4, seed=1)
    assert len(calls) == 6


def _build_in_child(prefix, queue):
    ds = MMapIndexedDataset(prefix)
    g = gd.GPTDataset("train", prefix, np.arange(len(ds)), ds, 500, 8, seed=9)
    queue.put(np.asarray(g.shuffle_idx).tolist())


def test_concurrent_builders_agree(tmp_path):
    prefix = str(tmp_path / "c")
    make_corpus(prefix, list(range(1, 120)))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(prefix, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".npy")]) == 3
