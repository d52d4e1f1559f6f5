"""Autograd-aware collectives for tensor and sequence parallelism (Megatron's mappings).

Each public function takes ``group=None`` (the tensor-parallel group from parallel_state) and is
the identity when the group has one rank, so single-process models trace without collectives.

Tensor-parallel regions split the last (hidden) dimension; sequence-parallel regions split the
sequence dimension, ``seq_dim`` (1 for our [b, s, h] activations).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_core.tensor_parallel.utils import group_rank, group_world_size, resolve_group


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=resolve_group(group))
    return x


def _split(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    world = group_world_size(group)
    if x.shape[dim] % world != 0:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by {world} ranks")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    world = group_world_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=resolve_group(group))
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    g = resolve_group(group)
    if dist.get_backend(g) == "gloo":  # gloo has no reduce_scatter
        return _split(_all_reduce(x, group), dim, group)
    chunks = [c.contiguous() for c in x.chunk(group_world_size(group), dim=dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=g)
    return out


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, grad_reduce_scatter):
        ctx.dim, ctx.group, ctx.rs = dim, group, grad_reduce_scatter
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        fn = _reduce_scatter if ctx.rs else _split
        return fn(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel layer)."""
    return x if group_world_size(group) == 1 else _Copy.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """All-reduce forward; identity backward (output of a row-parallel layer)."""
    return x if group_world_size(group) == 1 else _Reduce.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; all-gather the gradient."""
    return x if group_world_size(group) == 1 else _Scatter.apply(x, -1, group)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """All-gather the last dimension; keep this rank's slice of the gradient."""
    return x if group_world_size(group) == 1 else _Gather.apply(x, -1, group, False)


def scatter_to_sequence_parallel_region(x: torch.Tensor, seq_dim: int = 1, group: ProcessGroup | None = None) -> torch.Tensor:
    """Keep this rank's slice of the sequence; all-gather the gradient."""
    return x if group_world_size(group) == 1 else _Scatter.apply(x, seq_dim, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, seq_dim: int = 1, group: ProcessGroup | None = None, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather the sequence. Backward: reduce-scatter when the consumer is tensor-parallel
    (each rank holds a partial gradient), else just keep this rank's slice."""
    if group_world_size(group) == 1:
        return x
    return _Gather.apply(x, seq_dim, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, seq_dim: int = 1, group: ProcessGroup | None = None) -> torch.Tensor:
    """Sum partial results and keep this rank's slice of the sequence; all-gather the gradient."""
    return x if group_world_size(group) == 1 else _ReduceScatter.apply(x, seq_dim, group)
