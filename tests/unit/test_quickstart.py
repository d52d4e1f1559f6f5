"""The quickstart command, shortened: ``python deepy.py train.py <quickstart, fewer steps>``.

Runs the real entry points (deepy.py → DeepSpeed runner → train.py → pretrain) on the committed
corpus with a shorter config (fewer iterations, shorter sequences) and checks the loss falls by at
least 20% and the run's outputs exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neox.config.loader import read_yaml

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yml"


def test_quickstart_config_is_a_10_to_30m_model():
    from neox.config import NeoXArgs

    args = NeoXArgs.from_ymls([str(QUICKSTART)], world_size=1)
    m = args.model
    n = sum([m.num_layers * (4 * m.hidden_size**2 + 3 * m.hidden_size * m.intermediate_size + 2 * m.hidden_size),
             2 * m.padded_vocab_size * m.hidden_size, m.hidden_size])  # layers, untied embeddings, final norm
    assert 10e6 <= n <= 30e6, n
    assert args.tokenizer.tokenizer_type == "SPMTokenizer" and args.launcher.num_gpus == 1


@pytest.mark.skipif(not (REPO / "datasets/quickstart/tokenizer.model").exists(), reason="quickstart corpus missing")
def test_shortened_quickstart_loss_falls(tmp_path):
    cfg = read_yaml(QUICKSTART)
    cfg.update({"train_iters": 20, "seq_length": 128, "max_position_embeddings": 128,
                "train_micro_batch_size_per_gpu": 4, "eval_interval": 20, "eval_iters": 1, "log_interval": 1,
                "log_dir": str(tmp_path / "logs"), "tensorboard_dir": None, "save": str(tmp_path / "ckpt"),
                "checkpoint_factor": 1000, "master_port": 29617 + os.getpid() % 1000})
    short = tmp_path / "quickstart_short.yml"
    short.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "deepy.py", "train.py", str(short)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in lines if "split" not in r]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last <= 0.8 * first, losses
    assert {r["split"] for r in lines if "split" in r} == {"validation", "test"}
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "global_step20"
