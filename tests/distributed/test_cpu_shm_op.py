"""CPU ranks start without DeepSpeed's shared-memory all-reduce op (``deepspeed_shm_comm``): no JIT
compile (about 75 s on a machine's first run, and a C++ compiler at run time) and no 69 MB
/dev/shm buffer per rank. The reference is DeepSpeed's own state after neox initialises it: the comm
backend holds no shm op, /dev/shm holds no buffer for this run, and DeepSpeed's all_reduce still
sums across the ranks."""

from __future__ import annotations

import os

from tests.distributed.launch import run_distributed


def _init_and_probe(rank: int, world_size: int) -> dict:
    import deepspeed.comm as ds_dist
    import torch
    from deepspeed.comm import comm

    from neox.config import NeoXArgs
    from neox.training.pretrain import init_distributed

    args = NeoXArgs.from_flat({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
                               "train_micro_batch_size_per_gpu": 1}, world_size=world_size)
    init_distributed(args)
    buffer = "/dev/shm/deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], rank)
    total = torch.tensor([float(rank + 1)])
    ds_dist.all_reduce(total)
    return {"shm_op": comm.cdb.shm_comm_op is not None, "buffer": os.path.exists(buffer), "sum": total.item()}


def test_cpu_ranks_build_no_shm_op():
    results = run_distributed(_init_and_probe, 2)  # the accelerator does not depend on the world size
    assert results == [{"shm_op": False, "buffer": False, "sum": 3.0}] * 2
