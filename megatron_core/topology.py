"""Rank lists for tensor / data / pipeline parallel groups; pure functions, no torch.distributed.

The order is DeepSpeed's ``PipeModelDataParallelTopology``: axes ``[pipe, data, model]`` with the
model (tensor-parallel) axis varying fastest, so

    global_rank = (pipe_rank * dp + data_rank) * tp + tensor_rank

Tensor-parallel peers are therefore neighbouring ranks (one node, fast links), and the groups
computed here are the same lists DeepSpeed's ``PipelineParallelGrid`` builds for the pipe engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Coord:
    """Position of one rank on the three axes."""

    pipe: int
    data: int
    tensor: int


@dataclass(frozen=True)
class Topology:
    """A world of ``pp * dp * tp`` ranks laid out pipe-data-model."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int

    @classmethod
    def from_world(cls, world_size: int, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> Topology:
        """Derive the data-parallel size; raises ValueError when the sizes don't divide the world."""
        tp, pp = tensor_parallel_size, pipeline_parallel_size
        if tp < 1 or pp < 1 or world_size % (tp * pp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor parallel size {tp} x pipeline parallel size {pp}"
            )
        return cls(tp, pp, world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    def rank(self, pipe: int, data: int, tensor: int) -> int:
        """Global rank at these coordinates."""
        return (pipe * self.data_parallel_size + data) * self.tensor_parallel_size + tensor

    def coord(self, rank: int) -> Coord:
        """Coordinates of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        tensor = rank % self.tensor_parallel_size
        data = (rank // self.tensor_parallel_size) % self.data_parallel_size
        pipe = rank // (self.tensor_parallel_size * self.data_parallel_size)
        return Coord(pipe, data, tensor)

    def tensor_parallel_groups(self) -> list[list[int]]:
        """Ranks that share (pipe, data): they hold the shards of one set of layers."""
        return [
            [self.rank(p, d, t) for t in range(self.tensor_parallel_size)]
            for p in range(self.pipeline_parallel_size)
            for d in range(self.data_parallel_size)
        ]

    def data_parallel_groups(self) -> list[list[int]]:
        """Ranks that share (pipe, tensor): replicas whose gradients are averaged."""
        return [
            [self.rank(p, d, t) for d in range(self.data_parallel_size)]
            for p in range(self.pipeline_parallel_size)
            for t in range(self.tensor_parallel_size)
        ]

    def pipeline_parallel_groups(self) -> list[list[int]]:
        """Ranks that share (data, tensor): the stages of one pipeline."""
        return [
            [self.rank(p, d, t) for p in range(self.pipeline_parallel_size)]
            for d in range(self.data_parallel_size)
            for t in range(self.tensor_parallel_size)
        ]

    def model_parallel_groups(self) -> list[list[int]]:
        """Ranks that share data: one whole model (all tensor and pipeline shards)."""
        return [
            sorted(self.rank(p, d, t) for p in range(self.pipeline_parallel_size) for t in range(self.tensor_parallel_size))
            for d in range(self.data_parallel_size)
        ]
