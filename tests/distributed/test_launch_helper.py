import torch
import torch.distributed as dist

from tests.distributed.launch import run_distributed


def _allreduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_two_ranks_allreduce():
    assert run_distributed(_allreduce, 2) == [3.0, 3.0]
