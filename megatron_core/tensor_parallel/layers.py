"""Megatron-style tensor-parallel layers.

Weights are initialised as the FULL tensor (fp32, CPU, by ``init_method``) and each rank keeps its
shard, so one seed gives the same full model at any tensor-parallel size. ``device="meta"`` skips
initialisation (weights to be loaded later). Each layer declares how its parameters split over
the ranks (``tensor_splits()``, a ``TensorSplit`` per split parameter; the rest are replicated):
the initialisation cuts by it, and neox.model.layout reads it for converters and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megatron_core.tensor_parallel.grad_accumulation import linear
from megatron_core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_core.tensor_parallel.utils import (
    TensorSplit,
    divide,
    group_rank,
    group_world_size,
    set_tensor_model_parallel_attributes,
    shard,
    vocab_range,
)

InitMethod = Callable[[torch.Tensor], Any]


def _default_init(t: torch.Tensor) -> None:
    nn.init.normal_(t, mean=0.0, std=0.02)


def _init_shard(
    param: torch.Tensor, full_shape: tuple[int, ...], init_method: InitMethod | None, split: TensorSplit,
    rank: int, world: int,
) -> None:
    set_tensor_model_parallel_attributes(param, split.dim)
    if param.device.type == "meta":
        return
    full = torch.empty(full_shape, dtype=torch.float32)
    (init_method or _default_init)(full)
    with torch.no_grad():
        param.copy_(shard(full, split, rank, world))


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features) over the tensor-parallel ranks.

    ``sections`` splits fused weights section by section (e.g. [q, k, v] sizes), so each shard is
    [its q rows; its k rows; its v rows]. With ``sequence_parallel`` the input arrives split along
    the sequence and is all-gathered first.
    """

    # The local shard matmul, F.linear's contract (grad_accumulation.linear: the weight gradient can add
    # into a parked main_grad inside its GEMM); FP8 training swaps it per layer (neox/model/fp8.py).
    linear_fn: Callable[..., torch.Tensor] = staticmethod(linear)

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = True, gather_output: bool = False,
        init_method: InitMethod | None = None, sections: Sequence[int] | None = None,
        sequence_parallel: bool = False, seq_dim: int = 1, group: ProcessGroup | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group, self.gather_output = group, gather_output
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        world, rank = group_world_size(group), group_rank(group)
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = divide(out_features, world, "output features")
        self.split = TensorSplit(0, tuple(sections) if sections else None)
        kw = dict(device=device, dtype=dtype or torch.float32)
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, **kw))
        _init_shard(self.weight, (out_features, in_features), init_method, self.split, rank, world)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_per_rank, **kw))
            set_tensor_model_parallel_attributes(self.bias, self.split.dim)
        else:
            self.register_parameter("bias", None)

    def tensor_splits(self) -> dict[str, TensorSplit]:
        """Weight and bias split by output rows, fused sections each on its own."""
        return {"weight": self.split} | ({"bias": self.split} if self.bias is not None else {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.seq_dim, self.group, tensor_parallel_output_grad=True)
        else:
            x = copy_to_tensor_model_parallel_region(x, self.group)
        y = self.linear_fn(x, self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features} (per rank {self.out_per_rank}), bias={self.bias is not None}"


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features); partial results are summed.

    With ``sequence_parallel`` the sum is a reduce-scatter along the sequence. The bias is added
    after the reduction (replicated); under sequence parallelism its gradient is all-reduced.
    """

    # The local shard matmul, F.linear's contract (grad_accumulation.linear: the weight gradient can add
    # into a parked main_grad inside its GEMM); FP8 training swaps it per layer (neox/model/fp8.py).
    linear_fn: Callable[..., torch.Tensor] = staticmethod(linear)

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = True, input_is_parallel: bool = True,
        init_method: InitMethod | None = None, sequence_parallel: bool = False, seq_dim: int = 1,
        group: ProcessGroup | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group, self.input_is_parallel = group, input_is_parallel
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        world, rank = group_world_size(group), group_rank(group)
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = divide(in_features, world, "input features")
        self.split = TensorSplit(1)
        kw = dict(device=device, dtype=dtype or torch.float32)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, **kw))
        _init_shard(self.weight, (out_features, in_features), init_method, self.split, rank, world)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        else:
            self.register_parameter("bias", None)

    def tensor_splits(self) -> dict[str, TensorSplit]:
        """Weight split by input columns; the bias (added after the reduction) is replicated."""
        return {"weight": self.split}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.group)
        y = self.linear_fn(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.seq_dim, self.group)
        else:
            y = reduce_from_tensor_model_parallel_region(y, self.group)
        if self.bias is not None:
            bias = copy_to_tensor_model_parallel_region(self.bias, self.group) if self.sequence_parallel else self.bias
            y = y + bias
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features} (per rank {self.in_per_rank}), out={self.out_features}, bias={self.bias is not None}"


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split over the tensor-parallel ranks.

    Each rank looks up the tokens it owns, zeros the rest, and the partial results are all-reduced.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, *, init_method: InitMethod | None = None,
        group: ProcessGroup | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        world, rank = group_world_size(group), group_rank(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start, self.vocab_end = vocab_range(num_embeddings, rank, world)
        self.world = world
        self.split = TensorSplit(0)
        kw = dict(device=device, dtype=dtype or torch.float32)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, embedding_dim, **kw))
        _init_shard(self.weight, (num_embeddings, embedding_dim), init_method, self.split, rank, world)

    def tensor_splits(self) -> dict[str, TensorSplit]:
        """Rows (the vocabulary) split."""
        return {"weight": self.split}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim} (rows {self.vocab_start}:{self.vocab_end} here)"
