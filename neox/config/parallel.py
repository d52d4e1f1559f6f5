"""ParallelConfig: pipeline / tensor / data parallel sizes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    """Parallelism arguments."""

    pipe_parallel_size: int = 0
    """Pipeline stages. 0 builds a plain module; >= 1 builds a DeepSpeed PipelineModule with that many stages."""

    model_parallel_size: int = 1
    """Tensor (model) parallel size, Megatron-style."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism: split norms and dropout activations over the tensor-parallel ranks."""

    pipe_partition_method: str = "type:transformer|mlp"
    """How DeepSpeed's PipelineModule spreads layers over pipeline stages: 'parameters' (balance parameter counts), 'uniform' (balance layer counts) or 'type:REGEX' (balance the layers whose class name matches, e.g. GPT-NeoX's default 'type:transformer|mlp', which matches neox's TransformerBlockPipe)."""

    world_size: int | None = None
    """Total number of ranks. Derived: num_gpus * num_nodes at launch, the WORLD_SIZE environment variable on a rank."""

    data_parallel_size: int | None = None
    """Derived: world_size / (model_parallel_size * max(pipe_parallel_size, 1))."""
