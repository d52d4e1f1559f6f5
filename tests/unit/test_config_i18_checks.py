"""Issue 18 items 5, 6, 10: fp16 on CPU refused at launch, dry-run input warnings, attention_config 'all'."""

from __future__ import annotations

import json

import pytest

import deepy
from neox.config import NeoXArgs
from neox.errors import ConfigError
from neox.launcher import check_launchable

MODEL = ('{"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,'
         ' "padded_vocab_size": 128, "train_micro_batch_size_per_gpu": 1, "num_gpus": 1,\n')


def _conf(tmp_path, extra: str):
    path = tmp_path / "c.yml"
    path.write_text(MODEL + extra + "}\n")
    return path


def test_fp16_launch_on_cpu_is_one_line_error_but_dry_run_plans_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    conf = _conf(tmp_path, '"fp16": {"enabled": true},')
    args = NeoXArgs.from_ymls([str(conf)])
    with pytest.raises(ConfigError) as err:
        check_launchable(args)
    assert "\n" not in str(err.value) and "fp16" in str(err.value) and "precision: fp32" in str(err.value)
    assert deepy.main(["--dry-run", "train.py", str(conf)]) == 0


def test_dry_run_warns_about_each_missing_input(tmp_path, capsys):
    conf = _conf(tmp_path, f'"train_data_paths": ["{tmp_path}/nope"], "vocab_file": "{tmp_path}/v.json",')
    assert deepy.main(["--dry-run", "train.py", str(conf)]) == 0
    out = capsys.readouterr()
    warnings = json.loads(out.out)["warnings"]
    assert len(warnings) == 2 and "train_data_paths" in warnings[0] and "vocab_file" in warnings[1]
    assert [ln for ln in out.err.splitlines() if ln.startswith("neox: warning:")][-2:] == \
        [f"neox: warning: {w}" for w in warnings]
    with pytest.raises(ConfigError, match="train_data_paths"):  # the launch refuses the first
        check_launchable(NeoXArgs.from_ymls([str(conf)]))


def test_attention_config_all_as_upstream(tmp_path):
    args = NeoXArgs.from_ymls([str(_conf(tmp_path, '"attention_config": [[["global"], "all"]],'))])
    assert args.model.attention_config == ["global"] * 4
    with pytest.raises(ConfigError, match="attention_config"):
        NeoXArgs.from_ymls([str(_conf(tmp_path, '"attention_config": [[["global", "flash", "global"], "all"]],'))])
