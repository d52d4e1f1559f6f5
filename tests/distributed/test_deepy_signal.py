"""SIGTERM to deepy.py stops the whole run the way a preemption does (issue 18 item 2).

A 2-rank CPU run starts through ``python deepy.py train.py CONF`` (DeepSpeed's runner, its per-node
launcher, two ranks). Once metrics.jsonl shows training under way, deepy.py alone gets SIGTERM. The
references are outside deepy: the process table (every pid of the tree seen during the run is gone
afterwards), the disk (``latest`` names the iteration the ranks report stopping at, and that tag
verifies against its manifest), /dev/shm (no DeepSpeed buffer of this run's port) and deepy's exit
status (the ranks', 0 after a clean stop).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from neox.checkpoint import manifest as mf
from tests.distributed.test_train_parity import make_corpus, tiny_flat

ROOT = Path(__file__).resolve().parents[2]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_sigterm_to_deepy_saves_and_leaves_nothing(tmp_path):
    flat = tiny_flat(make_corpus(tmp_path), train_iters=100_000, save=str(tmp_path / "ckpt"),
                     checkpoint_factor=100_000, log_dir=str(tmp_path / "logs"), log_interval=1,
                     zero_optimization={"stage": 1}, train_micro_batch_size_per_gpu=2, num_gpus=2)
    conf = tmp_path / "run.yml"
    conf.write_text(json.dumps(flat))  # no master_port: a free one is picked (item 3)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)
    deepy = subprocess.Popen([sys.executable, str(ROOT / "deepy.py"), "train.py", str(conf)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "logs" / "metrics.jsonl"
    seen: dict[int, list[str]] = {}
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().strip()):
            assert deepy.poll() is None, deepy.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        for proc in _tree(deepy.pid):
            try:
                seen[proc.pid] = proc.cmdline()
            except psutil.Error:
                pass
        deepy.send_signal(signal.SIGTERM)
        out, err = deepy.communicate(timeout=180)
    finally:
        if deepy.poll() is None:
            for proc in _tree(deepy.pid):
                proc.kill()
            deepy.kill()
            deepy.wait()
    assert deepy.returncode == 0, err[-3000:]
    ranks = [pid for pid, cmd in seen.items() if any(a.endswith("train.py") for a in cmd) and "-m" not in cmd]
    assert len(ranks) == 2 and len(seen) >= 4, seen  # runner, launcher, two ranks
    assert not [pid for pid in seen if _alive(pid)]
    stops = re.findall(r"neox: stopped at iteration (\d+) \(([^)]*)\)", out)
    assert stops and stops[0][1] in ("signal SIGTERM", "stop requested on another rank"), out[-3000:]
    iteration = int(stops[0][0])
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{iteration}"
    man = mf.verify_tag(str(tmp_path / "ckpt" / f"global_step{iteration}"))
    assert man["iteration"] == iteration and man["layout"]["world_size"] == 2
    runner = next(cmd for cmd in seen.values() if "deepspeed.launcher.runner" in cmd)
    port = runner[runner.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert "SIGTERM: the ranks save" in err
