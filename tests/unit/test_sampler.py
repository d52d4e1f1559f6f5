"""Megatron pretraining sampler: per-rank slices of each step, exact resume from consumed samples."""

from __future__ import annotations

import itertools

import pytest

from neox.data.samplers import MegatronPretrainingSampler
from neox.errors import DataError


def batches(total, consumed, mb, rank, dp):
    return list(MegatronPretrainingSampler(total, consumed, mb, rank, dp))


@pytest.mark.parametrize("mb, dp", [(1, 1), (2, 3), (4, 2)])
def test_ranks_partition_each_step(mb, dp):
    total = 101
    per_rank = [batches(total, 0, mb, r, dp) for r in range(dp)]
    steps = total // (mb * dp)
    assert all(len(b) == steps for b in per_rank)
    for s in range(steps):
        together = list(itertools.chain.from_iterable(per_rank[r][s] for r in range(dp)))
        assert together == list(range(s * mb * dp, (s + 1) * mb * dp))


@pytest.mark.parametrize("mb, dp", [(2, 3), (3, 1)])
def test_resume_at_any_consumed_count_continues_exactly(mb, dp):
    total = 90
    step = mb * dp
    for rank in range(dp):
        full = batches(total, 0, mb, rank, dp)
        for k in range(total // step):
            assert batches(total, k * step, mb, rank, dp) == full[k:]


def test_errors_and_drop_last():
    assert batches(10, 0, 3, 0, 1)[-1] == [6, 7, 8]
    assert list(MegatronPretrainingSampler(10, 0, 3, 0, 1, drop_last=False))[-1] == [9]
    with pytest.raises(DataError, match="consumed samples 10"):
        MegatronPretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(DataError, match="data_parallel_rank"):
        MegatronPretrainingSampler(10, 0, 1, 2, 2)
