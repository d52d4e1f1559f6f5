"""build_data_iterators: shapes, splits, data-parallel slices and resume, against direct dataset reads."""

from __future__ import annotations

import pytest
import torch

from neox.config.data import DataConfig
from neox.data.builder import build_data_iterators, split_num_samples
from neox.errors import ConfigError
from tests.fixtures.data.corpus import make_corpus

SEQ = 8


def iters(cfg, **kw):
    args = dict(seq_length=SEQ, seed=1234, micro_batch_size=2, global_batch_size=4, dp_rank=0, dp_size=1,
                train_iters=20, eval_interval=10, eval_iters=2)
    return build_data_iterators(cfg, **(args | kw))


@pytest.fixture
def single(tmp_path):
    prefix = str(tmp_path / "one")
    make_corpus(prefix, [37] * 40)  # token value // 37 = document number
    return prefix


def test_split_data_path(single):
    cfg = DataConfig(data_path=single, split="8,1,1", num_workers=0)
    it = iters(cfg)
    docs = {}
    for name in ("train", "valid", "test"):
        batch = next(getattr(it, name))
        assert batch["text"].dtype == torch.int64 and batch["text"].shape == (2, SEQ + 1)
        docs[name] = set((batch["text"] // 37).flatten().tolist())
    # Megatron's split of 40 documents 8:1:1 is [0, 32), [32, 36), [36, 40).
    assert docs["train"] <= set(range(32)) and docs["valid"] <= set(range(32, 36)) and docs["test"] <= {36, 37, 38, 39}
    assert split_num_samples(4, 20, 10, 2) == [80, 24, 8]


def test_dp_ranks_slice_the_single_rank_batches_and_resume(single):
    cfg = DataConfig(data_path=single, split="1,0,0", num_workers=0)
    whole = iters(cfg, micro_batch_size=4, global_batch_size=4)
    ref = [next(whole.train)["text"] for _ in range(6)]
    ranks = [iters(cfg, dp_rank=r, dp_size=2) for r in range(2)]
    for step in range(6):
        parts = [next(ranks[r].train)["text"] for r in range(2)]
        torch.testing.assert_close(torch.cat(parts), ref[step])
    for consumed in (4, 12):
        resumed = iters(cfg, micro_batch_size=4, global_batch_size=4, consumed_train_samples=consumed)
        for step in range(consumed // 4, 6):
            torch.testing.assert_close(next(resumed.train)["text"], ref[step])
    assert iters(cfg).valid is None  # split gives validation no documents


def test_paths_mixture_and_workers(tmp_path):
    a, b, v = (str(tmp_path / n) for n in ("a", "b", "v"))
    make_corpus(a, [50] * 10)
    make_corpus(b, [50] * 10, start=10_000)
    make_corpus(v, [20] * 5, start=50_000)
    cfg = DataConfig(train_data_paths=[a, b], train_data_weights=[3, 1], valid_data_paths=[v], num_workers=0)
    it = iters(cfg, eval_iters=0)
    assert it.valid is None and it.test is None  # no evaluation asked for
    it = iters(cfg)
    tokens = torch.cat([next(it.train)["text"] for _ in range(20)])
    from_b = (tokens >= 10_000).any(dim=1).float().mean().item()
    assert 0.15 <= from_b <= 0.35  # weight 1/4, over 40 samples
    assert (next(it.valid)["text"] >= 50_000).all()
    with_workers = iters(DataConfig(train_data_paths=[a, b], train_data_weights=[3, 1], num_workers=1))
    again = iters(cfg)
    for _ in range(3):
        torch.testing.assert_close(next(with_workers.train)["text"], next(again.train)["text"])


def test_errors(tmp_path, single):
    with pytest.raises(ConfigError, match="no training data"):
        iters(DataConfig(num_workers=0))
    with pytest.raises(ConfigError, match="not a multiple"):
        iters(DataConfig(data_path=single, num_workers=0), global_batch_size=6, dp_size=2)
    with pytest.raises(ConfigError, match="2 weights for 1 datasets"):
        iters(DataConfig(train_data_paths=[single], train_data_weights=[1, 2], num_workers=0))
