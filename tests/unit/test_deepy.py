"""deepy.py as a user runs it: --dry-run JSON, one-line errors with exit code 2, NEOX_DEBUG tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = '{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "num_gpus": 2,\n' \
        ' "train_micro_batch_size_per_gpu": 2, "use_wandb": true,}\n'


def run_deepy(*argv, env_extra=None):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    env.pop("WANDB_API_KEY", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(ROOT / "deepy.py"), *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


@pytest.fixture()
def conf(tmp_path):
    path = tmp_path / "model.yml"
    path.write_text(MODEL)
    return path


def test_dry_run_prints_one_json_object_and_keeps_secrets(conf, tmp_path):
    out = run_deepy("--dry-run", "train.py", "-d", str(conf.parent), conf.name,
                    env_extra={"WANDB_API_KEY": "very-secret-key-123"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report) == {"args", "deepspeed_config", "launch_command", "warnings"}
    assert report["args"]["num_layers"] == 2 and report["args"]["world_size"] == 2
    assert all("-" not in key for key in report["args"])  # underscored keys
    assert report["deepspeed_config"]["train_batch_size"] == 4
    assert report["launch_command"][1:4] == ["-m", "deepspeed.launcher.runner", "--master_port"]
    assert report["launch_command"][-2] == "--neox_args_file"  # the config's path, not the config (item 7)
    assert len(" ".join(report["launch_command"])) < 400
    assert "very-secret-key-123" not in out.stdout + out.stderr


def test_user_error_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text('{"num_layer": 2}')
    out = run_deepy("--dry-run", "train.py", str(bad))
    assert out.returncode == 2
    assert out.stderr == f"neox: error: {bad}: num_layer: unknown key (did you mean 'num_layers'?)\n"
    assert out.stdout == ""


def test_missing_user_script(conf):
    out = run_deepy("--dry-run", "no_such_script.py", str(conf))
    assert out.returncode == 2 and out.stderr == "neox: error: no_such_script.py: user script not found\n"


def test_neox_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text('{"num_layer": 2}')
    out = run_deepy("--dry-run", "train.py", str(bad), env_extra={"NEOX_DEBUG": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_train_py_prints_one_line_errors():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--neox_args", "!!notbase64"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("neox: error: --neox_args:")
    assert out.stderr.count("\n") == 1


def test_neox_cli_overrides(conf, capsys, monkeypatch):
    import deepy

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert deepy.main(["--dry-run", "train.py", str(conf), "--wandb_group", "g1", "--wandb_team", "t1"]) == 0
    flat = json.loads(capsys.readouterr().out)["args"]
    assert (flat["wandb_group"], flat["wandb_team"]) == ("g1", "t1")
