"""Tensor / pipeline / data parallel process groups: the one place that holds them.

``initialize_model_parallel(tp, pp)`` needs ``torch.distributed`` initialised and creates one group
per rank list (every rank calls ``new_group`` for every list, as torch requires). Before that, or
after ``destroy_model_parallel()``, the getters answer rank 0, size 1 and group None, so models
run in one process without torch.distributed.

The module also serves as the ``mpu`` DeepSpeed expects (pass ``megatron_core.parallel_state``):
DeepSpeed's "model parallel" is tensor parallel here, as in GPT-NeoX (with pipeline parallelism
DeepSpeed uses its own grid built from the same topology instead of this mpu).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_core.topology import Topology


@dataclass
class _ParallelState:
    topology: Topology | None = None
    rank: int = 0
    tp_group: ProcessGroup | None = None
    pp_group: ProcessGroup | None = None
    dp_group: ProcessGroup | None = None
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    # The model-parallel RNG tracker (megatron_core.tensor_parallel.random); None until first use.
    rng_tracker: Any = None


_STATE = _ParallelState()


def _new_groups(lists: list[list[int]], rank: int) -> tuple[ProcessGroup | None, list[int]]:
    mine, ranks = None, []
    for ranks_ in lists:
        group = dist.new_group(ranks=ranks_)
        if rank in ranks_:
            mine, ranks = group, ranks_
    return mine, ranks


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> None:
    """Create the groups for a world of ``dist.get_world_size()`` ranks (data parallel size derived)."""
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed.init_process_group first")
    if _STATE.topology is not None:
        raise RuntimeError("model parallel groups are already initialised; call destroy_model_parallel first")
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = Topology.from_world(world, tensor_model_parallel_size, pipeline_model_parallel_size)
    # Creation order is fixed (tp, dp, pp) so every rank issues the same new_group sequence.
    _STATE.tp_group, _STATE.tp_ranks = _new_groups(topo.tensor_parallel_groups(), rank)
    _STATE.dp_group, _STATE.dp_ranks = _new_groups(topo.data_parallel_groups(), rank)
    _STATE.pp_group, _STATE.pp_ranks = _new_groups(topo.pipeline_parallel_groups(), rank)
    _STATE.rank = rank
    _STATE.topology = topo


def is_initialized() -> bool:
    return _STATE.topology is not None


def destroy_model_parallel() -> None:
    """Forget the groups (they are destroyed with the default process group)."""
    _STATE.__init__()  # type: ignore[misc]


def get_topology() -> Topology:
    """The topology in use; a 1x1x1 one when not initialised."""
    return _STATE.topology or Topology(1, 1, 1)


def _coord():
    return get_topology().coord(_STATE.rank) if is_initialized() else None


# Tensor (model) parallel.
def get_tensor_model_parallel_group() -> ProcessGroup | None:
    return _STATE.tp_group


def get_tensor_model_parallel_world_size() -> int:
    return get_topology().tensor_parallel_size


def get_tensor_model_parallel_rank() -> int:
    c = _coord()
    return c.tensor if c else 0


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of tensor-parallel rank 0 in this rank's group."""
    return _STATE.tp_ranks[0] if is_initialized() else 0


def get_tensor_model_parallel_ranks() -> list[int]:
    return list(_STATE.tp_ranks)


# Pipeline parallel.
def get_pipeline_model_parallel_group() -> ProcessGroup | None:
    return _STATE.pp_group


def get_pipeline_model_parallel_world_size() -> int:
    return get_topology().pipeline_parallel_size


def get_pipeline_model_parallel_rank() -> int:
    c = _coord()
    return c.pipe if c else 0


# Data parallel.
def get_data_parallel_group() -> ProcessGroup | None:
    return _STATE.dp_group


def get_data_parallel_world_size() -> int:
    return get_topology().data_parallel_size


def get_data_parallel_rank() -> int:
    c = _coord()
    return c.data if c else 0


def get_data_parallel_group_ranks() -> list[int]:
    return list(_STATE.dp_ranks)


# DeepSpeed's mpu names (GPT-NeoX meaning: model parallel = tensor parallel).
get_model_parallel_group = get_tensor_model_parallel_group
get_model_parallel_world_size = get_tensor_model_parallel_world_size
get_model_parallel_rank = get_tensor_model_parallel_rank
get_model_parallel_src_rank = get_tensor_model_parallel_src_rank
get_pipe_parallel_group = get_pipeline_model_parallel_group
get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
get_pipe_parallel_rank = get_pipeline_model_parallel_rank
