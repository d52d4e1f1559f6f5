"""Checkpoints with 2 gloo ranks: exact resume under ZeRO-1, loading at another data-parallel size,
and a rank SIGKILLed in the middle of a save.

References: the same 2-rank toy run without interruption; the tensors the 2-rank run saved (loaded
back into a 1-rank engine in this process).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import torch

from neox.checkpoint import load_checkpoint, save_checkpoint
from neox.checkpoint import manifest as mf
from neox.checkpoint.state import TrainState
from neox.config.run import CheckpointConfig
from tests.distributed.launch import free_port, run_distributed
from tests.unit.test_checkpoint import ToyArgs, init_single_rank, seed_all, toy_engine, toy_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _params(engine) -> list[torch.Tensor]:
    # numpy, not tensors: torch's queue would share tensor storage with a process about to exit
    return [p.detach().numpy().copy() for p in engine.module.parameters()]


def _full_moments(engine) -> list:
    """Adam's exp_avg / exp_avg_sq of every parameter, gathered from the ZeRO partitions."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return [safe_get_full_optimizer_state(p, key).numpy().copy()
            for p in engine.module.parameters() for key in ("exp_avg", "exp_avg_sq")]


def two_rank_resume(rank: int, world: int, root: str) -> dict:
    z1 = ToyArgs(CheckpointConfig(save=os.path.join(root, "z1"), load=os.path.join(root, "z1")))
    seed_all(100 + rank)
    ref = toy_run(toy_engine(zero=1, dp=2), TrainState(), 4)
    seed_all(100 + rank)
    engine, state = toy_engine(zero=1, dp=2), TrainState()
    first = toy_run(engine, state, 2)
    save_checkpoint(engine, z1.checkpoint, state, 2)
    saved_z1 = _params(engine)
    z1_moments = _full_moments(engine)
    seed_all(7)
    engine2 = toy_engine(seed=3, zero=1, dp=2)
    loaded = load_checkpoint(engine2, z1.checkpoint)
    loaded_dict = loaded.to_dict()
    rest = toy_run(engine2, loaded, 2)

    # a ZeRO-0 checkpoint (optimizer state whole in mp_rank_00) for the DP-change test
    z0 = ToyArgs(CheckpointConfig(save=os.path.join(root, "z0")))
    seed_all(200 + rank)
    e0, s0 = toy_engine(zero=0, dp=2), TrainState()
    toy_run(e0, s0, 2)
    save_checkpoint(e0, z0.checkpoint, s0, 2)
    exp_avg = [e0.optimizer.state[p]["exp_avg"].numpy().copy() for p in e0.module.parameters()]
    return {"ref": ref, "resumed": first + rest, "loaded": loaded_dict, "saved_z1": saved_z1, "z1_moments": z1_moments,
            "saved_z0": _params(e0), "exp_avg_z0": exp_avg}


def test_two_ranks_resume_and_dp_change(tmp_path, caplog):
    root = str(tmp_path)
    results = run_distributed(two_rank_resume, 2, root)
    for r in results:
        assert r["resumed"] == r["ref"]  # bitwise, every rank
        assert r["loaded"] == TrainState(iteration=2, consumed_train_samples=8).to_dict()
    man = mf.read_manifest(os.path.join(root, "z1", "global_step2"))
    assert man["layout"] == {"world_size": 2, "data_parallel_size": 2, "model_parallel_size": 1,
                             "pipe_parallel_size": 1, "zero_stage": 1}
    assert {"rng_state_rank0.pt", "rng_state_rank1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"} <= set(man["files"])

    # data-parallel size 2 -> 1 (this process is a 1-rank world)
    init_single_rank()
    one = toy_engine(seed=5, zero=0)
    state = load_checkpoint(one, CheckpointConfig(load=os.path.join(root, "z0")))
    assert state.iteration == 2
    for a, b in zip(one.module.parameters(), results[0]["saved_z0"]):
        assert torch.equal(a, torch.from_numpy(b))
    for p, ref in zip(one.module.parameters(), results[0]["exp_avg_z0"]):
        assert torch.equal(one.optimizer.state[p]["exp_avg"], torch.from_numpy(ref))  # ZeRO-0 optimizer state carries over
    one_z1 = toy_engine(seed=5, zero=1)
    with caplog.at_level(logging.WARNING):
        state = load_checkpoint(one_z1, CheckpointConfig(load=os.path.join(root, "z1")))
    assert "saved at data-parallel size 2, loading at 1; converting to DeepSpeed's universal" in caplog.text
    assert state.iteration == 2 and one_z1.global_steps == 2 and one_z1.lr_scheduler.last_epoch == 2
    for a, b in zip(one_z1.module.parameters(), results[0]["saved_z1"]):
        assert torch.equal(a, torch.from_numpy(b))
    # the ZeRO-partitioned Adam moments were resharded, not reset
    for a, b in zip(_full_moments(one_z1), results[0]["z1_moments"]):
        assert (a == b).all()
    assert not [n for n in os.listdir(os.path.join(root, "z1")) if "universal" in n]  # temp dir cleaned
    toy_run(one_z1, state, 1)


def kill_child(rank: int, port: int, save_dir: str, flag: str) -> None:
    """One of 2 ranks: save step 2, then rank 1 stalls inside DeepSpeed's write of step 4."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    engine, state = toy_engine(zero=1, dp=2), TrainState()
    args = ToyArgs(CheckpointConfig(save=save_dir))
    seed_all(rank)
    toy_run(engine, state, 2)
    save_checkpoint(engine, args.checkpoint, state, 2)
    toy_run(engine, state, 2)
    if rank == 1:
        real_save = torch.save

        def slow_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            open(flag, "w").close()
            time.sleep(600)

        torch.save = slow_save
    save_checkpoint(engine, args.checkpoint, state, 4)


def test_rank_sigkilled_during_save(tmp_path):
    save_dir, flag, port = str(tmp_path / "ckpt"), str(tmp_path / "flag"), free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", "from tests.distributed.test_checkpoint_dist import kill_child; "
                               f"kill_child({r}, {port}, {save_dir!r}, {flag!r})"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not os.path.exists(flag):
            for p in procs:
                assert p.poll() is None, p.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].wait()
        try:  # rank 0 is stuck in (or fails out of) a collective; a launcher would tear it down
            procs[0].wait(timeout=5)
        except subprocess.TimeoutExpired:
            procs[0].kill()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert open(os.path.join(save_dir, "latest")).read() == "global_step2"
    assert not os.path.exists(os.path.join(save_dir, "global_step4"))
    assert mf.verify_tag(os.path.join(save_dir, "global_step2")) is not None
    init_single_rank()
    engine = toy_engine(zero=0)
    assert load_checkpoint(engine, CheckpointConfig(load=save_dir)).iteration == 2
