"""Small helpers shared by the tensor-parallel layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_core import parallel_state


def group_world_size(group: ProcessGroup | None = None) -> int:
    """Size of ``group``; the tensor-parallel size from parallel_state when None."""
    if group is None:
        return parallel_state.get_tensor_model_parallel_world_size()
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None = None) -> int:
    """This rank's index in ``group``; the tensor-parallel rank from parallel_state when None."""
    if group is None:
        return parallel_state.get_tensor_model_parallel_rank()
    return dist.get_rank(group)


def resolve_group(group: ProcessGroup | None = None) -> ProcessGroup | None:
    return parallel_state.get_tensor_model_parallel_group() if group is None else group


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """Exact division; a ValueError naming ``what`` otherwise."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor parallel size {denominator}")
    return numerator // denominator


def shard_rows(full: torch.Tensor, rank: int, world: int, sections: Sequence[int] | None = None, dim: int = 0) -> torch.Tensor:
    """This rank's slice of ``full`` along ``dim``.

    With ``sections`` (sizes summing to ``full.shape[dim]``, e.g. [q, k, v] or [gate, up]) each section
    is split separately and the rank keeps [its part of section 0; its part of section 1; ...].
    """
    sections = list(sections) if sections else [full.shape[dim]]
    if sum(sections) != full.shape[dim]:
        raise ValueError(f"sections {sections} do not add up to {full.shape[dim]}")
    parts = []
    for chunk in torch.split(full, sections, dim=dim):
        size = divide(chunk.shape[dim], world, "partitioned dimension")
        parts.append(chunk.narrow(dim, rank * size, size))
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


def unshard_rows(shards: Sequence[torch.Tensor], sections: Sequence[int] | None = None, dim: int = 0) -> torch.Tensor:
    """Inverse of ``shard_rows``: rebuild the full tensor from every rank's shard (rank order)."""
    world = len(shards)
    full_size = shards[0].shape[dim] * world
    sections = list(sections) if sections else [full_size]
    local = [s // world for s in sections]
    per_rank = [torch.split(s, local, dim=dim) for s in shards]
    return torch.cat([per_rank[r][i] for i in range(len(sections)) for r in range(world)], dim=dim)


@dataclass(frozen=True)
class TensorSplit:
    """How a parameter's full tensor is split over the tensor-parallel ranks.

    Along ``dim``; with ``sections`` (full sizes along ``dim``, e.g. [q, k, v] or [gate, up]) each
    section is split on its own and a rank holds [its part of section 0; its part of section 1; ...].
    A parameter without a split is replicated.
    """

    dim: int
    sections: tuple[int, ...] | None = None


def shard(full: torch.Tensor, split: TensorSplit | None, rank: int, tp: int) -> torch.Tensor:
    """Rank ``rank``'s piece of ``full`` (of ``tp``); ``full`` itself when replicated or ``tp == 1``.

    The piece may be a view of ``full``. ValueError when a split dimension does not divide by ``tp``.
    """
    if split is None or tp == 1:
        return full
    return shard_rows(full, rank, tp, split.sections, dim=split.dim)


def unshard(shards: Sequence[torch.Tensor], split: TensorSplit | None) -> torch.Tensor:
    """The full tensor from every rank's piece (rank order); inverse of ``shard``."""
    if split is None or len(shards) == 1:
        return shards[0]
    return unshard_rows(shards, split.sections, dim=split.dim)


def set_tensor_model_parallel_attributes(param: torch.Tensor, partition_dim: int, stride: int = 1) -> None:
    """Mark a sharded parameter the way Megatron and DeepSpeed recognise (grad-norm counting)."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def vocab_range(global_vocab: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the vocabulary rows owned by ``rank``."""
    per = divide(global_vocab, world, "vocabulary size")
    return rank * per, (rank + 1) * per
