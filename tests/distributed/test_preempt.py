"""Preemption: SIGTERM (or SLURM's SIGUSR1) during training saves at the next iteration boundary and
exits cleanly, on both ranks even when only one received the signal.

Two real processes run pretrain() for many iterations; once metrics.jsonl shows training is under
way, one rank gets the signal. The reference is what is on disk afterwards: ``latest`` names the
iteration the run reports, and that tag verifies against its manifest and loads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from neox.checkpoint import manifest as mf
from tests.distributed.launch import free_port
from tests.distributed.test_train_parity import make_corpus, run_pretrain, tiny_flat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(rank: int, port: int, prefix: str, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    flat = tiny_flat(prefix, train_iters=100_000, save=f"{tmp}/ckpt", checkpoint_factor=100_000,
                     log_dir=f"{tmp}/logs", log_interval=1, zero_optimization={"stage": 1},
                     train_micro_batch_size_per_gpu=2)
    res = run_pretrain(flat, 2)
    print(json.dumps({"rank": rank, "iteration": res.state.iteration, "reason": res.stop_reason}), flush=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_signal_saves_and_exits_cleanly(tmp_path, sig):
    prefix, port, tmp = make_corpus(tmp_path), free_port(), str(tmp_path)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    code = "from tests.distributed.test_preempt import child; child({r}, {port}, {prefix!r}, {tmp!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code.format(r=r, port=port, prefix=prefix, tmp=tmp)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    metrics = tmp_path / "logs" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            for p in procs:
                assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        procs[1].send_signal(sig)  # one rank only: the stop is agreed through an all-reduce
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    iteration = results[0]["iteration"]
    assert results[1]["iteration"] == iteration and 2 <= iteration < 100_000
    assert results[1]["reason"] == f"signal {sig.name}" and results[0]["reason"] == "stop requested on another rank"
    assert f"stopped at iteration {iteration}" in outs[0][0]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == f"global_step{iteration}"
    man = mf.verify_tag(str(ckpt / f"global_step{iteration}"))
    assert man["iteration"] == iteration and man["layout"]["world_size"] == 2
