"""Launch commands for local CPU/GPU ranks, a hostfile, and srun; W&B key handling; the rank side;
the rendezvous port; num_gpus against the GPUs of this machine."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from neox.config import NeoXArgs
from neox.errors import ConfigError
from neox.handoff import decode_config, encode_config, rank_args, slurm_env_to_torch, write_config_file
from neox.launcher import (
    build_launch_command,
    check_launchable,
    filter_hosts,
    launch,
    launch_env,
    launch_port,
    parse_hostfile,
    planned_world_size,
    wandb_api_key,
)

MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
         "train_micro_batch_size_per_gpu": 1}


@pytest.fixture(autouse=True)
def no_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # this machine: no GPU, whatever the host has
    for var in ("SLURM_NNODES", "SLURM_GPUS_ON_NODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def resolve(**values):
    return NeoXArgs.from_flat({**MODEL, **values}, plan_world=planned_world_size)  # as deepy.py resolves


def test_local_cpu_ranks_command():
    # the config travels as a file (issue 18 item 7): the command names its path, not a base64 --neox_args
    args = resolve(num_gpus=2, master_port=29600)
    cmd = build_launch_command(args, "train.py", python="py")
    assert cmd[:-1] == ["py", "-m", "deepspeed.launcher.runner", "--master_port", "29600", "--num_gpus", "2",
                        "train.py", "--neox_args_file"]
    path = Path(cmd[-1])
    assert path.parent == Path(tempfile.gettempdir()) and path.suffix == ".json"  # every rank is on this machine
    assert len(" ".join(cmd)) < 300
    assert args.parallel.world_size == 2


def test_cpu_machine_plans_model_parallel_ranks():
    args = resolve(model_parallel_size=2)
    assert args.parallel.world_size == 2
    assert "--num_gpus" in (cmd := build_launch_command(args, "train.py")) and cmd[cmd.index("--num_gpus") + 1] == "2"


def test_too_few_gpus_plans_the_model_and_refuses_to_launch(monkeypatch):
    from neox.errors import ConfigError
    from neox.launcher import check_launchable, launch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert resolve().parallel.world_size == 4  # every visible GPU
    args = resolve(model_parallel_size=8, num_attention_heads=8)  # e.g. converting a mp-8 checkpoint on a 4-GPU machine
    assert args.parallel.world_size == 8
    with pytest.raises(ConfigError, match="this machine has 4 GPUs but the config needs 8 ranks"):
        launch(args, "train.py")
    # issue 18 item 9: num_gpus above the visible GPUs is refused too, in one line naming the key
    with pytest.raises(ConfigError, match=r"^num_gpus: 8 GPUs asked but this machine has 4 visible") as err:
        check_launchable(resolve(model_parallel_size=8, num_attention_heads=8, num_gpus=8))
    assert "\n" not in str(err.value)
    check_launchable(resolve(num_gpus=2))  # fewer than visible: the user's call


def test_hostfile_command_and_world_size(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nworker-0 slots=4\nworker-1 slots=4\n")
    assert parse_hostfile(str(hostfile)) == {"worker-0": 4, "worker-1": 4}
    args = resolve(hostfile=str(hostfile), model_parallel_size=2)
    assert args.parallel.world_size == 8 and args.parallel.data_parallel_size == 4
    cmd = build_launch_command(args, "train.py", python="py")
    assert cmd[3:9] == ["--master_port", "29500", "--hostfile", str(hostfile), "--launcher", "pdsh"]
    assert "--num_gpus" not in cmd

    one = resolve(hostfile=str(hostfile), num_nodes=1)
    assert one.parallel.world_size == 4 and "--num_nodes" in build_launch_command(one, "t.py")

    inc = resolve(hostfile=str(hostfile), include="worker-0:0,1@worker-1")
    assert inc.parallel.world_size == 6
    cmd = build_launch_command(inc, "t.py")
    assert cmd[cmd.index("--include") + 1] == "worker-0:0,1@worker-1" and "--num_nodes" not in cmd

    exc = resolve(hostfile=str(hostfile), exclude="worker-1:3")
    assert exc.parallel.world_size == 7
    two = resolve(hostfile=str(hostfile), num_gpus=2)  # DeepSpeed: num_gpus slots on every host
    assert two.parallel.world_size == 4
    assert filter_hosts({"a": 2, "b": 2}, None, "b") == {"a": [0, 1]}


def test_missing_hostfile_falls_back_to_local(tmp_path):
    args = resolve(hostfile=str(tmp_path / "mock_path"))  # NeoX's 125M.yml names "/mock_path"
    assert args.parallel.world_size == 1


def test_slurm_srun_command(tmp_path):
    # the config travels as a file in the run folder every node sees (issue 18 item 7), not as --neox_args
    args = resolve(launcher="slurm", deepspeed_slurm=True, num_gpus=8, num_nodes=2, model_parallel_size=2,
                   comment="neox", account="proj", log_dir=str(tmp_path / "logs"))
    assert args.parallel.world_size == 16
    cmd = build_launch_command(args, "train.py", python="py")
    assert cmd[:-1] == ["srun", "--ntasks=16", "--nodes=2", "--ntasks-per-node=8", "--comment=neox",
                        "--account=proj", "--export=ALL", "py", "-u", "train.py", "--neox_args_file"]
    assert Path(cmd[-1]).parent == tmp_path / "logs"
    assert args.launcher.master_port is None and "--master_port" not in cmd  # srun ranks: 29500 (handoff)
    without_run_folder = build_launch_command(resolve(deepspeed_slurm=True, launcher="slurm", num_gpus=2), "t.py")
    assert Path(without_run_folder[-1]).parent == Path.cwd()  # where srun starts the ranks


def test_slurm_env_becomes_torch_env():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu-node7"}
    slurm_env_to_torch(env, 29555)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("5", "1", "16", "29555")
    assert env["MASTER_ADDR"] == "gpu-node7"
    env2 = {"SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu[3-4,9]", "PATH": "/nonexistent"}
    slurm_env_to_torch(env2, 1)
    assert env2["MASTER_ADDR"] in ("gpu3", "gpu")  # scontrol when present, else the first name


def test_wandb_key_from_env_or_netrc(tmp_path):
    assert wandb_api_key({"WANDB_API_KEY": "k1"}) == "k1"
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret-from-netrc\n")
    netrc.chmod(0o600)
    assert wandb_api_key({"HOME": str(tmp_path)}) == "secret-from-netrc"
    assert wandb_api_key({"HOME": str(tmp_path / "none")}) is None


def test_launch_env_carries_the_key_not_the_command(tmp_path, monkeypatch):
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai login user password secret-from-netrc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    args = resolve(use_wandb=True, num_gpus=2)
    env = launch_env(args)
    assert env["WANDB_API_KEY"] == "secret-from-netrc" and env["DS_ACCELERATOR"] == "cpu"
    assert "secret-from-netrc" not in " ".join(build_launch_command(args, "train.py"))


def test_config_file_and_inline_config_reach_the_rank(tmp_path, monkeypatch):
    args = resolve(num_gpus=2)
    flat = args.to_flat()
    path = tmp_path / "run" / "neox_args-x.json"
    write_config_file(args, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(flat)) and path.stat().st_mode & 0o777 == 0o600
    assert decode_config(encode_config(flat)) == flat
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert rank_args(["--local_rank=1", "--neox_args_file", str(path)]) == args
    assert os.environ["LOCAL_RANK"] == "1"
    assert rank_args(["--neox_args", encode_config(flat)]) == args  # inline, for a rank started by hand
    monkeypatch.setenv("WORLD_SIZE", "4")  # more ranks than planned: the batch no longer adds up
    with pytest.raises(Exception, match="train_batch_size"):
        rank_args(["--neox_args_file", str(path)])
    with pytest.raises(ConfigError, match=r"^--neox_args_file: cannot read .*missing.json"):
        rank_args(["--neox_args_file", str(tmp_path / "missing.json")])
    with pytest.raises(ConfigError, match=r"^--neox_args_file: no config from the launcher"):
        rank_args([])


def test_launcher_module_does_not_import_torch():
    import subprocess

    code = "import sys, neox.launcher, neox.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_multi_node_key_goes_through_a_private_env_file(tmp_path, monkeypatch):
    import neox.process_tree

    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    monkeypatch.setenv("WANDB_API_KEY", "multi-node-secret")
    seen = {}

    def fake_run_tree(cmd, env):
        seen["cmd"], seen["env_file"] = cmd, env["DS_ENV_FILE"]
        seen["env_text"] = open(env["DS_ENV_FILE"]).read()
        seen["config_file"] = cmd[cmd.index("--neox_args_file") + 1]
        seen["config"] = json.loads(open(seen["config_file"]).read())
        return 0

    monkeypatch.setattr(neox.process_tree, "run_tree", fake_run_tree)
    args = resolve(hostfile=str(hostfile), log_dir=str(tmp_path / "logs"))
    assert launch(args, "train.py") == 0
    assert "WANDB_API_KEY=multi-node-secret" in seen["env_text"]
    assert "--log_level=warning" in seen["cmd"] and "multi-node-secret" not in " ".join(seen["cmd"])
    assert Path(seen["config_file"]).parent == tmp_path / "logs"  # on the run folder, which every node sees
    assert seen["config"]["world_size"] == 4 and seen["config"]["master_port"] == 29500
    assert not os.path.exists(seen["env_file"]) and not os.path.exists(seen["config_file"])  # removed after


def test_gpu_count_from_nvidia_smi_without_torch(tmp_path, monkeypatch):
    from neox.launcher import detect_local_gpus

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-b)'\n")
    fake.chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_local_gpus() == 2
    args = resolve()  # every GPU, and no --num_gpus so DeepSpeed uses the visible devices itself
    assert args.parallel.world_size == 2 and "--num_gpus" not in build_launch_command(args, "t.py")
    assert detect_local_gpus({"CUDA_VISIBLE_DEVICES": "0,3,5"}) == 3


def test_master_port_unset_is_free_locally_and_29500_across_nodes(tmp_path):
    local = resolve(num_gpus=2)
    assert local.launcher.master_port is None
    port = launch_port(local.launcher)
    with socket.socket() as s:  # independent check: the chosen port can be bound here
        s.bind(("", port))
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    assert launch_port(resolve(hostfile=str(hostfile)).launcher) == 29500
    assert launch_port(resolve(num_gpus=2, deepspeed_slurm=True).launcher) == 29500
    assert launch_port(resolve(num_gpus=2, master_port=29612).launcher) == 29612


def test_master_port_in_use_is_one_line_error(tmp_path, monkeypatch):
    import neox.process_tree

    started = []
    monkeypatch.setattr(neox.process_tree, "run_tree", lambda cmd, env: started.append(cmd) or 0)
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"^master_port: port {taken} is in use on this machine") as err:
            launch(resolve(num_gpus=2, master_port=taken), "train.py")
        assert "\n" not in str(err.value) and not started
        hostfile = tmp_path / "hosts"  # rank 0 is another host: the port is not checked here
        hostfile.write_text("worker-0 slots=2\nworker-1 slots=2\n")
        assert launch(resolve(hostfile=str(hostfile), master_port=taken), "train.py") == 0
    assert launch(resolve(num_gpus=2), "train.py") == 0  # unset: a free port, given to the runner
    cmd = started[-1]
    port = int(cmd[cmd.index("--master_port") + 1])
    with socket.socket() as s:
        s.bind(("", port))


def test_cpu_ranks_said_in_one_line(capsys):
    check_launchable(resolve(num_gpus=3))
    err = capsys.readouterr().err
    assert err == "neox: no GPU visible: starting 3 CPU rank(s) with gloo (num_gpus=3; without GPUs num_gpus " \
                  "counts CPU ranks)\n"
