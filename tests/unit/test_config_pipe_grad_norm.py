"""GPT-NeoX's Pythia 12B / 2.8B configs set log_grad_norm with pipe_parallel_size 1 (DeepSpeed's pipeline
engine, one stage): such a config resolves unchanged, written with upstream's dashed keys and as the
upstream file itself (tests/fixtures/neox_configs/pythia_12B.yml, byte-for-byte)."""

from __future__ import annotations

from pathlib import Path

import pytest

from neox.config import NeoXArgs
from neox.training.engine import uses_pipeline

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "neox_configs"

# the keys of upstream configs/pythia/2-8B.yml that matter here, spelled as GPT-NeoX users write them
PYTHIA_STYLE = """\
# GPT-NeoX pythia-style config
{
  # parallelism settings
  "pipe-parallel-size": 1,
  "model-parallel-size": 1,

  "num-layers": 2,
  "hidden-size": 64,
  "num-attention-heads": 4,
  "seq-length": 128,
  "max-position-embeddings": 128,
  "pos-emb": "rotary",
  "rotary-pct": 0.25,
  "no-weight-tying": true,
  "gpt-j-residual": true,
  "output-layer-parallelism": "column",
  "attention-config": [[["flash"], 2]],

  "optimizer": {"type": "Adam", "params": {"lr": 0.00016, "betas": [0.9, 0.95], "eps": 1.0e-8}},
  "zero_optimization": {"stage": 1, "allgather_partitions": True, "overlap_comm": True,
                        "reduce_scatter": True, "contiguous_gradients": True, "cpu_offload": False},
  "train-micro-batch-size-per-gpu": 8,
  "gradient-accumulation-steps": 2,
  "gradient_clipping": 1.0,
  "fp16": {"fp16": true, "enabled": true, "loss_scale": 0, "loss_scale_window": 1000,
           "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1},

  "train-iters": 100,
  "log-interval": 10,
  "steps_per_print": 10,
  "wall_clock_breakdown": true,
  "log-grad-norm": true,
  "tokenizer-type": "CharLevelTokenizer",
}
"""


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_pythia_style_log_grad_norm_on_one_pipeline_stage_resolves(tmp_path):
    path = tmp_path / "pythia.yml"
    path.write_text(PYTHIA_STYLE)
    a = NeoXArgs.from_ymls([str(path)], world_size=4)
    assert a.logging.log_grad_norm is True and a.parallel.pipe_parallel_size == 1
    assert uses_pipeline(a.parallel)  # the pipeline engine, as GPT-NeoX runs it
    ds = a.deepspeed_config()
    assert ds["zero_optimization"]["stage"] == 1 and ds["fp16"]["enabled"] is True
    assert ds["train_batch_size"] == 8 * 2 * 4


def test_upstream_pythia_12B_resolves_unchanged():
    a = NeoXArgs.from_ymls([str(FIXTURES / "pythia_12B.yml")], world_size=256)  # 4-way tensor parallel
    assert a.logging.log_grad_norm is True and a.parallel.pipe_parallel_size == 1
    assert (a.parallel.model_parallel_size, a.parallel.data_parallel_size) == (4, 64)
    assert a.training.train_batch_size == 8 * 2 * 64
