"""The SLURM job scripts end to end on one machine, with stand-ins for srun, scontrol, pdsh and ssh.

Three jobs of a tiny model, each started exactly as SLURM starts a batch script (``bash SCRIPT
CONFIGS`` with the SLURM_* environment of an allocation):

- ``one_node``: neox_1node.sbatch, srun path (``deepspeed_slurm: true`` in the config), 1 node x 2
  ranks. The stand-in srun records its arguments and starts both ranks. Its losses are the reference.
- ``two_nodes``: neox_multinode.sbatch, hostfile path, 2 nodes x 1 rank, through the real DeepSpeed
  runner (its pdsh backend, ``deepspeed.launcher.launch --node_rank 0/1`` per "node"; only pdsh and
  ssh are stand-ins, running each node's command in a login-like environment). SLURM's time-limit
  warning (SIGUSR1 to the batch shell) arrives before the first iteration ends: the job must save
  at iteration 1, exit 0 and requeue itself with ``scontrol requeue``.
- ``requeued``: the same script and arguments again (what SLURM does after a requeue): it must find
  ``save/latest``, load it, and finish the run, so that iterations 1..6 across both runs train to
  the same losses as the one-node reference.

The one-node job and the first two-node job run at the same time to keep the wall time down.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.test_train_parity import STEPS, make_corpus, tiny_flat
from tests.fixtures.slurm.fakes import fake_job_env, install_fakes, read_calls

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "slurm"
TIMEOUT = 300


def _start(script: str, configs: list[Path], env: dict[str, str], out: Path) -> subprocess.Popen:
    log = open(out, "w")  # noqa: SIM115 - closed when the test module's processes are done
    return subprocess.Popen(["bash", str(SCRIPTS / script), *map(str, configs)], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {text!r} appeared in {path}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


def _finish(proc: subprocess.Popen, out: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"job timed out; its output:\n{out.read_text()[-4000:]}") from None


def _free_job_id(avoid: int = -1) -> int:
    """A job id whose derived master port (20000 + id mod 12000) is free now."""
    for _ in range(100):
        job_id = random.randrange(1000, 12000)
        if job_id == avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in 20000-32000")


def _losses(log_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["iteration"]: r["lm_loss"] for r in records if "split" not in r}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("slurm_jobs")
    bin_dir = install_fakes(tmp / "bin")
    base = tmp / "base.yml"
    base.write_text(json.dumps(tiny_flat(make_corpus(tmp), train_micro_batch_size_per_gpu=2,
                                         zero_optimization={"stage": 1})))
    one_cfg, two_cfg = tmp / "one_node.yml", tmp / "two_nodes.yml"
    one_cfg.write_text(json.dumps({"log_dir": str(tmp / "one_logs"), "launcher": "slurm", "deepspeed_slurm": True}))
    two_cfg.write_text(json.dumps({"log_dir": str(tmp / "two_logs"), "save": str(tmp / "ckpt"),
                                   "checkpoint_factor": 1000}))

    def env(name: str, job_id: int, nodelist: str, slots: int, restart: int = 0) -> dict[str, str]:
        e = fake_job_env(bin_dir, tmp / f"{name}_calls.jsonl", job_id=job_id, nodelist=nodelist, slots=slots,
                         submit_dir=REPO, restart=restart)
        e["NEOX_RUN_DIR"] = str(tmp / f"run_{name}")
        return e

    one_id = _free_job_id()
    two_id = _free_job_id(avoid=one_id)
    one = _start("neox_1node.sbatch", [base, one_cfg], env("one", one_id, "gpu07", 2), tmp / "one.out")
    two_env = env("two", two_id, "node[01-02]", 1)
    two = _start("neox_multinode.sbatch", [base, two_cfg], two_env, tmp / "two.out")
    # SLURM's warning, once the script has installed its trap and started the launcher
    _wait_for(tmp / "run_two" / "events.log", "launch (hostfile)", two)
    two.send_signal(signal.SIGUSR1)
    rc = {"one": _finish(one, tmp / "one.out"), "two": _finish(two, tmp / "two.out")}
    first_losses = _losses(tmp / "two_logs") if (tmp / "two_logs" / "metrics.jsonl").exists() else {}
    latest_after_stop = (tmp / "ckpt" / "latest").read_text().strip() if (tmp / "ckpt" / "latest").exists() else None
    again = _start("neox_multinode.sbatch", [base, two_cfg], {**two_env, "SLURM_RESTART_COUNT": "1"},
                   tmp / "requeued.out")
    rc["requeued"] = _finish(again, tmp / "requeued.out")
    return {"tmp": tmp, "rc": rc, "first_losses": first_losses, "latest_after_stop": latest_after_stop,
            "ids": {"one": one_id, "two": two_id}}


def _ok(jobs: dict[str, Any], name: str) -> None:
    out = jobs["tmp"] / f"{name}.out"
    assert jobs["rc"][name] == 0, f"{name} exited {jobs['rc'][name]}:\n{out.read_text()[-4000:]}"


def test_srun_path_records_and_trains(jobs):
    _ok(jobs, "one")
    tmp = jobs["tmp"]
    [srun] = read_calls(tmp / "one_calls.jsonl", "srun")
    assert "--ntasks=2" in srun["argv"] and "--nodes=1" in srun["argv"] and "--export=ALL" in srun["argv"]
    assert srun["command"][1:3] == ["-u", "train.py"]
    assert srun["env"]["MASTER_ADDR"] == "127.0.0.1" and srun["env"]["MASTER_PORT"] == str(20000 + jobs["ids"]["one"])
    config = srun["config"]  # what every rank received (the --neox_args_file, read by the stand-in srun)
    assert Path(srun["command"][srun["command"].index("--neox_args_file") + 1]).parent == tmp / "one_logs"
    assert config["deepspeed_slurm"] is True and config["world_size"] == 2
    assert config["kill_switch_path"] == str(tmp / "run_one" / "STOP")
    assert config["hostfile"] == str(tmp / "run_one" / "hostfile")
    assert (tmp / "run_one" / "hostfile").read_text() == "gpu07 slots=2\n"
    losses = _losses(tmp / "one_logs")
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]


def test_hostfile_path_runs_two_nodes_through_deepspeed_runner(jobs):
    _ok(jobs, "two")
    tmp = jobs["tmp"]
    assert (tmp / "run_two" / "hostfile").read_text() == "node01 slots=1\nnode02 slots=1\n"
    pdsh = read_calls(tmp / "two_calls.jsonl", "pdsh")
    assert pdsh and pdsh[0]["hosts"] == ["node01", "node02"]
    command = " ".join(pdsh[0]["argv"])
    assert "deepspeed.launcher.launch" in command and "--node_rank=%n" in command
    assert "--master_addr=127.0.0.1" in command and f"--master_port={20000 + jobs['ids']['two']}" in command
    assert not read_calls(tmp / "two_calls.jsonl", "srun")


def test_usr1_saves_and_requeues(jobs):
    _ok(jobs, "two")
    tmp = jobs["tmp"]
    # the signal is in before the first poll; on 2 ranks the agreed flag is read one poll later
    assert jobs["latest_after_stop"] == "global_step2"
    assert sorted(jobs["first_losses"]) == [1, 2]
    requeues = [c["argv"] for c in read_calls(tmp / "two_calls.jsonl", "scontrol") if c["argv"][0] == "requeue"]
    two_id = str(jobs["ids"]["two"])
    assert requeues == [["requeue", two_id]]
    events = (tmp / "run_two" / "events.log").read_text()
    assert "got SIGUSR1" in events and f"requeueing job {two_id}" in events


def test_requeued_job_resumes_to_the_one_node_losses(jobs):
    _ok(jobs, "requeued")
    tmp = jobs["tmp"]
    overrides = json.loads("".join((tmp / "run_two" / "job_overrides.yml").read_text().splitlines(True)[1:]))
    assert overrides["load"] == str(tmp / "ckpt")
    assert (tmp / "ckpt" / "latest").read_text().strip() == f"global_step{STEPS}"
    assert "restart 1" in (tmp / "run_two" / "events.log").read_text()
    requeues = [c for c in read_calls(tmp / "two_calls.jsonl", "scontrol") if c["argv"][0] == "requeue"]
    assert len(requeues) == 1  # the finished run does not requeue again
    two, one = _losses(tmp / "two_logs"), _losses(tmp / "one_logs")
    assert sorted(two) == list(range(1, STEPS + 1))
    for it in range(1, STEPS + 1):
        assert abs(two[it] - one[it]) <= 2e-4 * max(1.0, abs(one[it])), (it, two, one)
