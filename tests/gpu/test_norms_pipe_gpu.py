"""CUDA-only: log_grad_norm on the pipeline engine in fp16, as GPT-NeoX's Pythia 12B / 2.8B configs train
(pipe_parallel_size 1, fp16 with a dynamic loss scale, ZeRO-1; and ZeRO-0's FP16_Optimizer, also on the plain
engine, whose loss DeepSpeed 0.19 leaves unscaled and neox scales: neox/training/engine.py). The captured
norms are unscaled (loss scale 4096 here): their total equals DeepSpeed's own global norm, and the first
step's per-parameter norms are those of the fp32 plain-engine run of the same model and batch (fp16's
tolerance). The CPU tests (tests/distributed/test_norms_pipe.py) cover fp32 and bf16 exactly.

    python -m pytest -q tests/gpu/test_norms_pipe_gpu.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FP16 = {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 12, "hysteresis": 2,
        "min_loss_scale": 1}
VARIANTS = {
    "plain_fp32": {},
    "pipe1_fp16_zero1": {"pipe_parallel_size": 1, "fp16": FP16, "zero_optimization": {"stage": 1}},
    "pipe1_fp16": {"pipe_parallel_size": 1, "fp16": FP16},
    "plain_fp16": {"fp16": FP16},  # ZeRO 0 without a pipeline: FP16_Optimizer on the plain engine
}

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def train_all(tmp: str) -> None:
    """Each variant's training records into ``{tmp}/records.json`` (run in a fresh process: one GPU, NCCL)."""
    from tests.distributed.test_train_parity import make_corpus, run_pretrain, tiny_flat

    prefix = make_corpus(Path(tmp))
    out = {}
    for name, over in VARIANTS.items():
        log_dir = f"{tmp}/{name}"
        run_pretrain(tiny_flat(prefix, train_iters=3, log_grad_norm=True, log_dir=log_dir, **over), 1)
        lines = Path(log_dir, "metrics.jsonl").read_text().splitlines()
        out[name] = [r for r in map(json.loads, lines) if "split" not in r]
    Path(tmp, "records.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list]:
    tmp = tmp_path_factory.mktemp("norms_pipe_gpu")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    code = f"from tests.gpu.test_norms_pipe_gpu import train_all; train_all({str(tmp)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / "records.json").read_text())


@pytest.mark.parametrize("name", ["pipe1_fp16_zero1", "pipe1_fp16", "plain_fp16"])
def test_fp16_pipeline_norms_are_unscaled_and_total_the_global_norm(runs, name):
    recs = runs[name]
    assert len(recs) == 3 and recs[0]["loss_scale"] == 4096.0
    applied = [r for i, r in enumerate(recs) if r["skipped_iterations"] == (recs[i - 1]["skipped_iterations"] if i else 0)]
    assert applied, "every step overflowed"
    for rec in applied:
        assert rec["grad_norm_total"] == pytest.approx(math.sqrt(sum(v * v for v in rec["grad_norms"].values())))
        assert rec["grad_norm"] is not None and rec["grad_norm_total"] == pytest.approx(rec["grad_norm"], rel=2e-3)


@pytest.mark.parametrize("name", ["pipe1_fp16_zero1", "pipe1_fp16", "plain_fp16"])
def test_fp16_pipeline_first_step_norms_match_fp32_plain(runs, name):
    got, want = runs[name][0], runs["plain_fp32"][0]
    assert got["skipped_iterations"] == 0
    assert set(got["grad_norms"]) == set(want["grad_norms"])
    assert got["grad_norms"] == pytest.approx(want["grad_norms"], rel=3e-2)
    assert got["grad_norm_total"] == pytest.approx(want["grad_norm_total"], rel=1e-2)
