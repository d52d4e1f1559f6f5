"""Tensor-parallel building blocks in one process: shard layout, RNG streams, single-rank layers."""

import torch
import torch.nn.functional as F

from megatron_core import parallel_state as ps
from megatron_core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    fork_model_parallel_rng,
    get_rng_tracker,
    model_parallel_manual_seed,
    vocab_parallel_cross_entropy,
)
from megatron_core.tensor_parallel.utils import shard_rows, unshard_rows


def test_sectioned_shards_follow_the_contract_layout():
    # [q0 q1 q2 q3 | k0 k1 | v0 v1] rows, 2 ranks -> rank 1 holds [q2 q3 k1 v1]
    full = torch.arange(8.0).unsqueeze(1)
    shard = shard_rows(full, 1, 2, [4, 2, 2])
    assert shard.squeeze(1).tolist() == [2, 3, 5, 7]
    shards = [shard_rows(full, r, 2, [4, 2, 2]) for r in range(2)]
    assert torch.equal(unshard_rows(shards, [4, 2, 2]), full)
    cols = torch.arange(12.0).view(2, 6)
    assert torch.equal(unshard_rows([shard_rows(cols, r, 3, dim=1) for r in range(3)], dim=1), cols)


def test_single_rank_layers_are_plain_torch():
    assert not ps.is_initialized()
    init = lambda t: torch.nn.init.normal_(t, std=0.5, generator=torch.Generator().manual_seed(3))  # noqa: E731
    col = ColumnParallelLinear(6, 4, init_method=init)
    row = RowParallelLinear(6, 4, init_method=init)
    emb = VocabParallelEmbedding(10, 4, init_method=init)
    ref = torch.empty(4, 6)
    init(ref)
    assert torch.equal(col.weight, ref) and torch.equal(row.weight, ref)
    assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0 and row.weight.partition_dim == 1
    x = torch.randn(2, 3, 6)
    assert torch.allclose(col(x), F.linear(x, ref)) and torch.allclose(row(x), F.linear(x, ref))
    ids = torch.tensor([[0, 9, 3]])
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight))
    logits, target = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    assert torch.allclose(vocab_parallel_cross_entropy(logits, target),
                          F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))


def test_meta_device_skips_initialisation():
    col = ColumnParallelLinear(6, 4, device="meta")
    assert col.weight.is_meta


def test_rng_tracker_streams():
    model_parallel_manual_seed(5)
    a_default = torch.rand(3)
    with fork_model_parallel_rng():
        a_mp = torch.rand(3)
    a_default2 = torch.rand(3)
    model_parallel_manual_seed(5)
    assert torch.equal(torch.rand(3), a_default)  # the default stream is not disturbed by the fork
    with fork_model_parallel_rng():
        assert torch.equal(torch.rand(3), a_mp)
    assert torch.equal(torch.rand(3), a_default2)
    assert not torch.equal(a_mp, a_default)
    get_rng_tracker().reset()
