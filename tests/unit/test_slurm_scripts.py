"""scripts/slurm: nodelist expansion, hostfile text, the per-job config fragment, and the job scripts'
syntax and headers. References are written by hand from SLURM's hostlist syntax and sbatch's manual.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.slurm.fakes import install_fakes, read_calls

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "scripts" / "slurm"
SCRIPTS = ["neox_1node.sbatch", "neox_multinode.sbatch"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"slurm_{name}", SLURM / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


mh = _load("make_hostfile")
jc = _load("job_config")


# ---- nodelists and hostfiles --------------------------------------------------------------------


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("n1,n[3-4],login", ["n1", "n3", "n4", "login"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("a[1-2]-ib", ["a1-ib", "a2-ib"]),
    ("p4d-st-[1-2],p4d-st-2", ["p4d-st-1", "p4d-st-2"]),
    ("x[098-101]", ["x098", "x099", "x100", "x101"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert mh.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["a[1-", "a]1[", "a[3-1]", "a[x]", "a[1-2-3]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="nodelist"):
        mh.expand_nodelist(bad)


def test_hostnames_prefers_scontrol(tmp_path, monkeypatch):
    bin_dir = install_fakes(tmp_path / "bin")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    assert mh.hostnames("node[1-2]", str(bin_dir / "scontrol")) == ["node1", "node2"]
    assert read_calls(log, "scontrol")[0]["argv"] == ["show", "hostnames", "node[1-2]"]
    assert mh.hostnames("node[1-2]", None) == ["node1", "node2"]


def test_hostfile_text_and_errors():
    assert mh.hostfile_text(["a", "b"], 8) == "a slots=8\nb slots=8\n"
    with pytest.raises(ValueError, match="slots"):
        mh.hostfile_text(["a"], 0)
    with pytest.raises(ValueError, match="empty"):
        mh.hostfile_text([], 8)


def test_slots_from_env():
    assert mh.slots_from_env({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert mh.slots_from_env({"SLURM_GPUS_PER_NODE": "h100:4"}) == 4
    assert mh.slots_from_env({"SLURM_NTASKS_PER_NODE": "2(x3)"}) == 2
    assert mh.slots_from_env({"NEOX_SLOTS": "1", "SLURM_GPUS_ON_NODE": "8"}) == 1
    assert mh.slots_from_env({}) == 1


def test_master_port_is_stable_and_in_range():
    assert mh.master_port(123456) == mh.master_port("123456")
    assert mh.master_port(1) != mh.master_port(2)
    assert all(20000 <= mh.master_port(j) < 32768 for j in (0, 1, 11999, 12000, 10**9 + 7))


def test_cli_writes_hostfile_without_scontrol(tmp_path):
    out = tmp_path / "deep" / "hosts"
    env = {**os.environ, "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_GPUS_ON_NODE": "4", "PATH": "/usr/bin:/bin"}
    env.pop("NEOX_SLOTS", None)
    subprocess.run([sys.executable, str(SLURM / "make_hostfile.py"), "--output", str(out)], env=env, check=True)
    assert out.read_text() == "gpu1 slots=4\ngpu2 slots=4\n"
    addr = subprocess.run([sys.executable, str(SLURM / "make_hostfile.py"), "--print", "master_addr"], env=env,
                          check=True, capture_output=True, text=True).stdout
    assert addr.strip() == "gpu1"
    bad = subprocess.run([sys.executable, str(SLURM / "make_hostfile.py"), "--nodelist", "a[2-1]"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "runs backwards" in bad.stderr


# ---- the per-job config fragment -----------------------------------------------------------------


def _plan(user, tmp_path, mode="auto", **kw):
    return jc.plan_job(user, mode=mode, hostfile="/run/hostfile", master_addr="node1", master_port=21234,
                       kill_switch=str(tmp_path / "STOP"), **kw)


def test_plan_hostfile_path_adds_only_unset_keys(tmp_path):
    plan = _plan({"save": str(tmp_path / "ckpt"), "master_port": 6000}, tmp_path)
    assert plan.mode == "hostfile"
    assert plan.overrides == {"hostfile": "/run/hostfile", "master_addr": "node1",
                              "kill_switch_path": str(tmp_path / "STOP")}
    assert plan.save == str(tmp_path / "ckpt") and "load" not in plan.overrides


def test_plan_srun_path(tmp_path):
    auto = _plan({"launcher": "slurm", "deepspeed_slurm": True}, tmp_path, slots=8, num_nodes=4)
    assert auto.mode == "srun"
    assert auto.overrides["num_gpus"] == 8 and auto.overrides["num_nodes"] == 4
    assert "launcher" not in auto.overrides and "deepspeed_slurm" not in auto.overrides
    forced = _plan({}, tmp_path, mode="srun", slots=8, num_nodes=4)
    assert forced.overrides["launcher"] == "slurm" and forced.overrides["deepspeed_slurm"] is True
    assert any("cannot resume" in n for n in forced.notes)


def test_plan_conflicts_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="launcher: the config sets 'pdsh'"):
        _plan({"launcher": "pdsh"}, tmp_path, mode="srun")
    with pytest.raises(ValueError, match="deepspeed_slurm"):
        _plan({"deepspeed_slurm": True}, tmp_path, mode="hostfile")
    with pytest.raises(ValueError, match="NEOX_LAUNCH"):
        _plan({}, tmp_path, mode="mpi")


def test_plan_resumes_from_save_once_latest_exists(tmp_path):
    ckpt = tmp_path / "ckpt"
    user = {"save": str(ckpt)}
    assert "load" not in _plan(user, tmp_path).overrides
    ckpt.mkdir()
    (ckpt / "latest").write_text("global_step10")
    plan = _plan(user, tmp_path)
    assert plan.overrides["load"] == str(ckpt) and plan.replaced == {}
    # a run that started from base weights continues from its own checkpoints, with its full state
    base = {**user, "load": "/base/model", "finetune": True, "no_save_optim": True}
    plan = _plan(base, tmp_path)
    assert plan.replaced == {"load": str(ckpt), "finetune": False}
    assert plan.overrides["no_load_optim"] is True and "load" not in plan.overrides
    assert any("replacing load: '/base/model', finetune: True" in n for n in plan.notes)
    assert _plan({**user, "load": str(ckpt)}, tmp_path).replaced == {}
    kept = _plan(base, tmp_path, resume=False)
    assert kept.replaced == {} and "load" not in kept.overrides


def test_plan_keeps_the_users_kill_switch(tmp_path):
    plan = _plan({"kill_switch_path": "/shared/STOP_ME"}, tmp_path)
    assert plan.kill_switch == "/shared/STOP_ME" and "kill_switch_path" not in plan.overrides


def _job_config(tmp_path, *configs: str, mode: str = "srun") -> tuple[list[str], dict[str, str], str]:
    """Run job_config.py and ``eval`` its output in bash, as env.sh does: (deepy args, values, stderr)."""
    run = tmp_path / "run"
    cmd = " ".join(map(shlex.quote, [
        sys.executable, str(SLURM / "job_config.py"), "--run-dir", str(run), "--hostfile", str(run / "hostfile"),
        "--master-addr", "n1", "--master-port", "21000", "--mode", mode, "--slots", "4", "--num-nodes", "2",
        *configs]))
    script = f'plan="$({cmd})" || exit 2; eval "$plan"; printf "%s\\n" "${{NEOX_DEEPY_ARGS[@]}}"; ' \
             'echo "MODE=$NEOX_MODE"; echo "SAVE=$NEOX_SAVE"; echo "STOP=$NEOX_KILL_SWITCH"'
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    values = dict(line.split("=", 1) for line in lines[-3:])
    return lines[:-3], values, res.stderr


def test_job_config_cli_reads_neox_yaml(tmp_path):
    from neox.config.loader import read_yaml

    conf = tmp_path / "my conf"  # a space survives the shell round trip
    conf.mkdir()
    # NeoX style: braces, comments, dashed keys, trailing comma
    (conf / "a.yml").write_text('{\n  "save": "%s", # checkpoints\n  "train-iters": 10,\n}\n' % (tmp_path / "ck"))
    deepy_args, values, _ = _job_config(tmp_path, "-d", str(conf), "a.yml")
    run = tmp_path / "run"
    assert deepy_args == ["-d", str(conf), "a.yml", str(run / "job_overrides.yml")]
    assert values == {"MODE": "srun", "SAVE": str(tmp_path / "ck"), "STOP": str(run / "STOP")}
    assert read_yaml(run / "job_overrides.yml") == {
        "launcher": "slurm", "deepspeed_slurm": True, "hostfile": str(run / "hostfile"), "master_addr": "n1",
        "master_port": 21000, "num_gpus": 4, "num_nodes": 2, "kill_switch_path": str(run / "STOP")}
    bad = subprocess.run([sys.executable, str(SLURM / "job_config.py"), "--run-dir", str(run), "--hostfile", "h",
                          "--master-addr", "n1", "--master-port", "1", str(tmp_path / "missing.yml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.yml" in bad.stderr


def test_job_config_resumes_a_run_that_started_from_base_weights(tmp_path):
    """Like configs/llemma_7b.yml: load = converted base weights, finetune: true. Once save/latest
    exists, deepy.py gets one merged config that loads save with finetune off; it still validates."""
    from neox.config import NeoXArgs

    ckpt = tmp_path / "ck"
    model = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
             "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2, "train_batch_size": 16,
             "train_iters": 10, "tokenizer_type": "CharLevelTokenizer"}
    (tmp_path / "model.yml").write_text(json.dumps(model))
    (tmp_path / "run.yml").write_text(json.dumps({"save": str(ckpt), "load": "/base/weights", "finetune": True}))
    configs = [str(tmp_path / "model.yml"), str(tmp_path / "run.yml")]
    first, _, _ = _job_config(tmp_path, *configs)
    assert first[:-1] == configs  # first start: the user's files as they are
    ckpt.mkdir()
    (ckpt / "latest").write_text("global_step5")
    again, _, err = _job_config(tmp_path, *configs)
    merged = tmp_path / "run" / "job_config.yml"
    assert again == [str(merged)] and not (tmp_path / "run" / "job_overrides.yml").exists()
    assert "resuming from" in err and "replacing load" in err
    args = NeoXArgs.from_ymls([str(merged)])
    assert args.checkpoint.load == str(ckpt) and args.checkpoint.finetune is False
    assert args.model.hidden_size == 64 and args.launcher.deepspeed_slurm is True
    assert args.parallel.world_size == 8 and args.training.gradient_accumulation_steps == 1


# ---- the job scripts ------------------------------------------------------------------------------


def _headers(script: str) -> dict[str, str]:
    out = {}
    for line in (SLURM / script).read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


@pytest.mark.parametrize("script", SCRIPTS + ["env.sh"])
def test_scripts_are_valid_bash(script):
    res = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script, nodes", [("neox_1node.sbatch", "1"), ("neox_multinode.sbatch", "2")])
def test_sbatch_headers(script, nodes):
    h = _headers(script)
    assert (SLURM / script).read_text().startswith("#!/bin/bash\n")
    assert h["nodes"] == nodes and h["ntasks-per-node"] == h["gpus-per-node"] == "8"
    assert int(h["cpus-per-task"]) > 0 and re.fullmatch(r"\d+:\d\d:\d\d", h["time"])
    assert "requeue" in h and h["open-mode"] == "append"  # a requeued run appends to the same log
    assert h["signal"] == "B:USR1@120"  # the batch shell gets the warning 120 s before the end
    assert "%j" in h["output"] and h["output"] == h["error"]
    assert "partition" not in h and "account" not in h  # site-specific: commented out


def test_job_script_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", str(SLURM / "neox_1node.sbatch"), "x.yml"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "not inside a SLURM job" in res.stderr
    elsewhere = subprocess.run(["bash", str(SLURM / "neox_1node.sbatch"), "x.yml"], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
    assert elsewhere.returncode == 2 and "is not a neox checkout" in elsewhere.stderr
    usage = subprocess.run(["bash", str(SLURM / "neox_multinode.sbatch")], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage: sbatch scripts/slurm/neox_multinode.sbatch" in usage.stderr


FAKE_DEEPY = """
import json, os, sys, time
# stand-in for deepy.py: wait for the STOP file named in the job's config fragment, then exit
fragment = open(sys.argv[-1]).read().split("\\n", 1)[1]
stop = json.loads(fragment)["kill_switch_path"]
open(os.environ["READY"], "w").close()
for _ in range(300):
    if os.path.exists(stop):
        sys.exit(int(os.environ["FAKE_RC"]))
    time.sleep(0.1)
sys.exit(99)
"""


def _warned_job(tmp_path, fake_rc: int, restarts: int = 0) -> tuple[int, str, list]:
    """env.sh with a stand-in launcher: SIGUSR1 to the batch shell; returns (exit code, stderr, requeues)."""
    bin_dir = install_fakes(tmp_path / "bin")
    (tmp_path / "deepy.py").write_text(FAKE_DEEPY)
    (tmp_path / "c.yml").write_text("{}")
    run, ready, calls = tmp_path / "run", tmp_path / "ready", tmp_path / "calls"
    run.mkdir(exist_ok=True)
    (run / "STOP").touch()  # left by a previous run: must not stop this one
    ready.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(calls),
           "SLURM_JOB_ID": "55", "SLURM_JOB_NODELIST": "n1", "SLURM_RESTART_COUNT": str(restarts),
           "NEOX_MAX_REQUEUES": "3", "NEOX_ROOT": str(tmp_path), "NEOX_RUN_DIR": str(run), "READY": str(ready),
           "NEOX_PYTHON": sys.executable, "FAKE_RC": str(fake_rc)}
    script = f"source {SLURM / 'env.sh'}; neox_launch {tmp_path / 'c.yml'}"
    proc = subprocess.Popen(["bash", "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if ready.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    requeues = [c["argv"] for c in read_calls(calls, "scontrol") if c["argv"][0] == "requeue"]
    calls.unlink(missing_ok=True)
    return proc.returncode, err, requeues


def test_usr1_saves_then_requeues_only_after_a_clean_exit(tmp_path):
    rc, err, requeues = _warned_job(tmp_path, fake_rc=0)
    assert rc == 0 and requeues == [["requeue", "55"]], err
    assert "got SIGUSR1" in err and "requeueing job 55" in err
    rc, err, requeues = _warned_job(tmp_path, fake_rc=3)
    assert rc == 3 and requeues == [] and "not requeueing: training failed" in err
    rc, err, requeues = _warned_job(tmp_path, fake_rc=0, restarts=3)
    assert rc == 0 and requeues == [] and "NEOX_MAX_REQUEUES=3" in err
    events = (tmp_path / "run" / "events.log").read_text()
    assert events.count("got SIGUSR1") == 3 and "launch (hostfile)" in events


def test_dry_run_of_the_one_node_hostfile_path(tmp_path):
    """neox_1node.sbatch's default path, resolved by the real deepy.py --dry-run: DeepSpeed's runner
    with the job's hostfile, rendezvous and STOP file, and 2 ranks from the hostfile's slots."""
    bin_dir = install_fakes(tmp_path / "bin")
    conf = tmp_path / "c.yml"
    conf.write_text(json.dumps({
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
        "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2, "train_batch_size": 4,
        "train_iters": 10, "tokenizer_type": "CharLevelTokenizer", "save": str(tmp_path / "ck")}))
    from tests.fixtures.slurm.fakes import fake_job_env

    env = fake_job_env(bin_dir, tmp_path / "calls", job_id=4321, nodelist="gpu07", slots=2, submit_dir=REPO)
    env.update(NEOX_RUN_DIR=str(tmp_path / "run"), NEOX_DRY_RUN="1", NEOX_PYTHON=sys.executable)
    env.pop("NEOX_MASTER_ADDR")
    res = subprocess.run(["bash", str(SLURM / "neox_1node.sbatch"), str(conf)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    cmd = report["launch_command"]
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    flags = dict(zip(cmd[3:cmd.index("train.py"):2], cmd[4:cmd.index("train.py"):2]))
    run = tmp_path / "run"
    assert flags == {"--master_port": str(20000 + 4321), "--master_addr": "gpu07",
                     "--hostfile": str(run / "hostfile"), "--launcher": "pdsh"}
    assert (run / "hostfile").read_text() == "gpu07 slots=2\n"
    args = report["args"]
    assert args["world_size"] == 2 and args["gradient_accumulation_steps"] == 1
    assert args["kill_switch_path"] == str(run / "STOP") and args["load"] is None
    assert "launch (hostfile)" in (run / "events.log").read_text()
