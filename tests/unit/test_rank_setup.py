"""What a rank does with deepspeed_mpi (DeepSpeed's MPI discovery) and pipe_partition_method (handed to
DeepSpeed's PipelineModule)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from neox.config import NeoXArgs
from neox.errors import ConfigError

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, padded_vocab_size=128,
            train_micro_batch_size_per_gpu=1, tokenizer_type="CharLevelTokenizer")


def _fake_mpi(rank: int, size: int) -> types.ModuleType:
    """mpi4py as MPI.COMM_WORLD answers a process launched by mpirun (written from mpi4py's API)."""
    comm = types.SimpleNamespace(Get_rank=lambda: rank, Get_size=lambda: size, bcast=lambda obj, root=0: obj or "10.0.0.1",
                                 allgather=lambda name: [name] * size)
    mpi = types.SimpleNamespace(COMM_WORLD=comm, Get_processor_name=lambda: "node0")
    module = types.ModuleType("mpi4py")
    module.MPI = mpi
    return module


def test_deepspeed_mpi_reads_the_ranks_from_mpi(monkeypatch):
    from neox.training.pretrain import discover_mpi

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", _fake_mpi(rank=1, size=2))
    import deepspeed.comm.comm as ds_comm

    # an earlier test in this process may have left DeepSpeed's comm backend up (a world of one); an
    # MPI-launched rank starts without it
    monkeypatch.setattr(ds_comm, "cdb", None)
    args = NeoXArgs.from_flat({**BASE, "deepspeed_mpi": True, "master_port": 29611}, world_size=2)
    discover_mpi(args)
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.1", "29611")
    with pytest.raises(ConfigError, match="deepspeed_mpi: MPI reports 2 ranks but the config was resolved for world_size 4"):
        discover_mpi(NeoXArgs.from_flat({**BASE, "deepspeed_mpi": True}, world_size=4))


def test_deepspeed_mpi_without_mpi4py_is_one_line(monkeypatch):
    from neox.training.pretrain import discover_mpi

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails
    with pytest.raises(ConfigError, match="deepspeed_mpi: reading the ranks from MPI needs mpi4py"):
        discover_mpi(NeoXArgs.from_flat({**BASE, "deepspeed_mpi": True}, world_size=1))


def test_pipe_partition_method_reaches_the_pipeline_module(monkeypatch):
    import neox.model.pipe as pipe
    from neox.training import pretrain

    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self, cfg, **kw):
            super().__init__()
            seen.update(kw)

    monkeypatch.setattr(pipe, "GPTModelPipe", Recorder)
    for name in ("get_pipeline_model_parallel_world_size", "get_tensor_model_parallel_world_size",
                 "get_data_parallel_world_size"):
        monkeypatch.setattr(pretrain.parallel_state, name, lambda: 1)
    args = NeoXArgs.from_flat({**BASE, "pipe_parallel_size": 1, "pipe_partition_method": "uniform"}, world_size=1)
    pretrain.build_model(args, torch.device("cpu"))
    assert seen["partition_method"] == "uniform"
