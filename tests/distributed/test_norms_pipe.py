"""log_grad_norm on DeepSpeed's pipeline engine (GPT-NeoX's Pythia configs: pipe_parallel_size 1): the
per-parameter gradient norms are those of the plain engine's run of the same model and seed (reference:
pipe_parallel_size 0, the same GPTModel names), and where DeepSpeed reports its own global norm (ZeRO-1,
bf16) their total equals it. A two-stage run on two ranks gathers both stages' norms."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.launch import run_distributed
from tests.distributed.test_train_parity import make_corpus, run_pretrain, tiny_flat

ITERS = 3
ONE_RANK = {
    "plain": {},
    "pipe1": {"pipe_parallel_size": 1},
    "pipe1_zero1": {"pipe_parallel_size": 1, "zero_optimization": {"stage": 1}},
    "pipe1_bf16": {"pipe_parallel_size": 1, "bf16": {"enabled": True}},
}
TWO_RANKS = {"pp2": {"pipe_parallel_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}}


def _records(rank: int, world: int, prefix: str, tmp: str, variants: dict[str, dict[str, Any]]) -> dict[str, list]:
    out = {}
    for name, over in variants.items():
        log_dir = f"{tmp}/{name}"
        run_pretrain(tiny_flat(prefix, train_iters=ITERS, log_grad_norm=True, log_dir=log_dir, **over), world)
        if rank == 0:
            lines = Path(log_dir, "metrics.jsonl").read_text().splitlines()
            out[name] = [r for r in map(json.loads, lines) if "split" not in r]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list]:
    tmp = tmp_path_factory.mktemp("norms_pipe")
    prefix = make_corpus(tmp)
    single = run_distributed(_records, 1, prefix, str(tmp / "one"), ONE_RANK, timeout=600)[0]
    double = run_distributed(_records, 2, prefix, str(tmp / "two"), TWO_RANKS, timeout=600)[0]
    return {**single, **double}


def _same_norms(got: list, want: list, rel: float) -> None:
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want] == list(range(1, ITERS + 1))
    for a, b in zip(got, want):
        assert set(a["grad_norms"]) == set(b["grad_norms"])  # GPTModel names on both engines
        assert a["grad_norms"] == pytest.approx(b["grad_norms"], rel=rel)
        assert a["grad_norm_total"] == pytest.approx(math.sqrt(sum(v * v for v in a["grad_norms"].values())))


def test_plain_reference_total_is_the_global_norm(runs):
    plain = runs["plain"]
    assert "layers.1.attention.query_key_value.weight" in plain[0]["grad_norms"]
    for rec in plain:
        assert rec["grad_norm_total"] == pytest.approx(rec["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("name", ["pipe1", "pipe1_zero1"])
def test_one_stage_pipeline_logs_the_plain_runs_norms(runs, name):
    _same_norms(runs[name], runs["plain"], rel=1e-5)


@pytest.mark.parametrize("name", ["pipe1_zero1", "pipe1_bf16"])
def test_pipeline_total_equals_deepspeeds_global_norm(runs, name):
    for rec in runs[name]:
        assert rec["grad_norm"] is not None
        assert rec["grad_norm_total"] == pytest.approx(rec["grad_norm"], rel=1e-5)


def test_two_stages_gather_both_stages_norms(runs):
    # micro-batch 2 x accumulation 2 = the reference's one batch of 4: the same mean gradient
    _same_norms(runs["pp2"], runs["plain"], rel=1e-4)
