"""Launch commands for local CPU/GPU ranks, a hostfile, and srun; W&B key handling; the rank side."""

from __future__ import annotations

import sys

import pytest

from neox.config import NeoXArgs
from neox.launcher import (
    build_launch_command,
    decode_config,
    encode_config,
    filter_hosts,
    launch_env,
    parse_hostfile,
    slurm_env_to_torch,
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
    return NeoXArgs.from_flat({**MODEL, **values})  # world size planned as the launcher would


def test_local_cpu_ranks_command():
    args = resolve(num_gpus=2, master_port=29600)
    cmd = build_launch_command(args, "train.py", python="py")
    assert cmd[:-1] == ["py", "-m", "deepspeed.launcher.runner", "--master_port", "29600", "--num_gpus", "2",
                        "train.py", "--neox_args"]
    assert decode_config(cmd[-1]) == args.to_flat()
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
    check_launchable(resolve(model_parallel_size=8, num_attention_heads=8, num_gpus=8))  # explicit num_gpus is the user's call


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


def test_slurm_srun_command():
    args = resolve(launcher="slurm", deepspeed_slurm=True, num_gpus=8, num_nodes=2, model_parallel_size=2,
                   comment="neox", account="proj")
    assert args.parallel.world_size == 16
    cmd = build_launch_command(args, "train.py", python="py")
    assert cmd[:-1] == ["srun", "--ntasks=16", "--nodes=2", "--ntasks-per-node=8", "--comment=neox",
                        "--account=proj", "--export=ALL", "py", "-u", "train.py", "--neox_args"]
    assert decode_config(cmd[-1])["world_size"] == 16


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


def test_config_encoding_round_trip_and_from_launcher(monkeypatch):
    args = resolve(num_gpus=2)
    flat = args.to_flat()
    assert decode_config(encode_config(flat)) == flat
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    rank_args = NeoXArgs.from_launcher(["--local_rank=1", "--neox_args", encode_config(flat)])
    assert rank_args == args
    monkeypatch.setenv("WORLD_SIZE", "4")  # more ranks than planned: the batch no longer adds up
    with pytest.raises(Exception, match="train_batch_size"):
        NeoXArgs.from_launcher(["--neox_args", encode_config(flat)])


def test_launcher_module_does_not_import_torch():
    import subprocess

    code = "import sys, neox.launcher, neox.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_multi_node_key_goes_through_a_private_env_file(tmp_path, monkeypatch):
    import subprocess as sp

    import neox.launcher as launcher

    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    monkeypatch.setenv("WANDB_API_KEY", "multi-node-secret")
    seen = {}

    def fake_run(cmd, env):
        seen["cmd"], seen["env_file"] = cmd, env["DS_ENV_FILE"]
        seen["env_text"] = open(env["DS_ENV_FILE"]).read()
        return sp.CompletedProcess(cmd, 0)

    monkeypatch.setattr(launcher.subprocess, "run", fake_run)
    args = resolve(hostfile=str(hostfile))
    assert launcher.launch(args, "train.py") == 0
    assert "WANDB_API_KEY=multi-node-secret" in seen["env_text"]
    assert "--log_level=warning" in seen["cmd"] and "multi-node-secret" not in " ".join(seen["cmd"])
    import os

    assert not os.path.exists(seen["env_file"])  # removed after the launch


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
