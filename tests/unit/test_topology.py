"""Rank lists against DeepSpeed's PipeModelDataParallelTopology, and parallel_state on a fake backend."""

import pytest
import torch.distributed as dist

from megatron_core import parallel_state as ps
from megatron_core.topology import Topology

SIZES = [(1, 1, 1), (2, 1, 1), (2, 2, 2), (4, 2, 1), (1, 3, 2), (2, 1, 4)]


@pytest.mark.parametrize("tp,pp,dp", SIZES)
def test_groups_match_deepspeed(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    ref = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    topo = Topology.from_world(tp * pp * dp, tp, pp)
    assert topo.data_parallel_size == dp
    norm = lambda groups: sorted(sorted(g) for g in groups)  # noqa: E731
    assert norm(topo.tensor_parallel_groups()) == norm(ref.get_axis_comm_lists("model") or [[r] for r in range(topo.world_size)])
    assert norm(topo.data_parallel_groups()) == norm(ref.get_axis_comm_lists("data") or [[r] for r in range(topo.world_size)])
    assert norm(topo.pipeline_parallel_groups()) == norm(ref.get_axis_comm_lists("pipe") or [[r] for r in range(topo.world_size)])
    for r in range(topo.world_size):
        c, rc = topo.coord(r), ref.get_coord(r)
        assert (c.pipe, c.data, c.tensor) == (rc.pipe, rc.data, rc.model)
        assert topo.rank(c.pipe, c.data, c.tensor) == r
    for d, group in enumerate(topo.model_parallel_groups()):
        assert group == sorted(ref.filter_match(data=d))


def test_sizes_must_divide():
    with pytest.raises(ValueError, match="not divisible"):
        Topology.from_world(6, 4, 1)


def test_uninitialised_getters():
    assert not ps.is_initialized()
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_tensor_model_parallel_rank() == 0
    assert ps.get_data_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_rank() == 0
    assert ps.get_tensor_model_parallel_group() is None and ps.get_data_parallel_group() is None


def _fake_world_checks() -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=8)
    try:
        ps.initialize_model_parallel(2, 2)
        # rank 5 = pipe 1, data 0, tensor 1 in an 8-rank world of tp 2 x pp 2 x dp 2
        assert ps.get_tensor_model_parallel_rank() == 1 and ps.get_tensor_model_parallel_world_size() == 2
        assert ps.get_pipeline_model_parallel_rank() == 1 and ps.get_data_parallel_rank() == 0
        assert ps.get_tensor_model_parallel_ranks() == [4, 5] and ps.get_data_parallel_group_ranks() == [5, 7]
        assert ps.get_tensor_model_parallel_src_rank() == 4
        assert ps.get_model_parallel_world_size() == 2 and ps.get_pipe_parallel_world_size() == 2
        assert ps.get_tensor_model_parallel_group() is not None
        with pytest.raises(RuntimeError, match="already"):
            ps.initialize_model_parallel(2, 2)
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    assert ps.get_tensor_model_parallel_world_size() == 1


def test_initialize_on_fake_backend():
    # In a fresh interpreter: an earlier test module may have left this process's default group set.
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=_fake_world_checks)
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0, "fake-backend parallel_state checks failed (see the traceback above)"
