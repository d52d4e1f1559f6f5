"""pretrain() on 2 gloo ranks reproduces the single-rank losses (fp32): DP 2 with ZeRO-1 and ZeRO-2,
tensor parallel 2, pipeline parallel 2; gradient accumulation 2 x micro-batch 2 == 1 x 4 on one rank.

The reference is the same config trained on one rank. Runs are grouped per spawned process group
(each spawn costs seconds): one 1-rank group (reference, accumulation, bf16, logging outputs, kill
switch) and one 2-rank group (the four parallel layouts).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.distributed.launch import run_distributed

STEPS = 6
SEQ = 32


def make_corpus(out_dir: Path) -> str:
    """A tiny char-level corpus (bytes as token ids, EOD 0) with learnable structure."""
    from neox.data.indexed_dataset import MMapIndexedDatasetBuilder

    prefix = str(out_dir / "tiny_text_document")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "quick", "brown", "fox", "jumps", "over"]
    for doc in range(60):
        text = " ".join(words[i] for i in rng.integers(0, len(words), size=40)) + f" {doc}."
        builder.add_item(np.array(list(text.encode()) + [0], dtype=np.uint16))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def tiny_flat(prefix: str, **overrides: Any) -> dict[str, Any]:
    """Flat NeoX keys of a 2-layer, hidden-64 LLaMA-style model on the char corpus."""
    flat = {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": SEQ,
        "max_position_embeddings": SEQ, "norm": "rmsnorm", "pos_emb": "rotary", "activation": "swiglu",
        "intermediate_size": 128, "use_bias_in_norms": False, "use_bias_in_attn_linear": False,
        "use_bias_in_mlp": False, "no_weight_tying": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "tokenizer_type": "CharLevelTokenizer", "make_vocab_size_divisible_by": 128,
        "train_data_paths": [prefix], "valid_data_paths": [prefix], "test_data_paths": [prefix],
        "num_workers": 0,
        "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "lr_decay_style": "cosine", "warmup_iters": 2, "min_lr": 3.0e-4, "weight_decay": 0.1,
        "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "train_iters": STEPS,
        "eval_interval": 1000, "eval_iters": 1, "log_interval": 1, "seed": 1234,
        "pipe_parallel_size": 0, "model_parallel_size": 1,
    }
    flat.update(overrides)
    return flat


@dataclass
class Run:
    """What the tests read of one pretrain() run: its final state and stop reason (its return value) and
    each logged iteration's loss from ``{log_dir}/metrics.jsonl`` (non-finite ones, logged as null, read
    as NaN). Rank 0 writes that file: ``losses`` is None on the other ranks."""

    state: Any
    stop_reason: str | None
    losses: list[float] | None


def logged_losses(metrics: Path, skip: int = 0) -> list[float]:
    """The training records' ``lm_loss`` of a metrics.jsonl, after its first ``skip`` lines."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()[skip:]]
    return [math.nan if r["lm_loss"] is None else r["lm_loss"] for r in records if "split" not in r]


def run_pretrain(flat: dict[str, Any], world_size: int) -> Run:
    """Build NeoXArgs for a world of ``world_size`` and train; resets the model-parallel groups after.

    Without a ``log_dir`` in ``flat`` the run logs into a temporary one, read for ``Run.losses``."""
    from neox.config import NeoXArgs
    from neox.training.pretrain import pretrain

    with tempfile.TemporaryDirectory(prefix="neox-run-") as scratch:
        flat = {**flat, "log_dir": flat.get("log_dir") or scratch}
        metrics = Path(flat["log_dir"]) / "metrics.jsonl"
        before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        args = NeoXArgs.from_flat(flat, world_size=world_size)
        try:
            result = pretrain(args)
        finally:
            release_groups()
        losses = logged_losses(metrics, before) if metrics.exists() else None
    return Run(result.state, result.stop_reason, losses)


def release_groups() -> None:
    """Forget neox's model-parallel groups and DeepSpeed's reference to them (``groups.mpu``), so a
    later engine in the same process does not ask the released groups for ranks."""
    from deepspeed.utils import groups

    from megatron_core import parallel_state

    parallel_state.destroy_model_parallel()
    groups.mpu = None


def _guarded(fn: Any) -> Any:
    """Run one variant; return its traceback text instead of raising, so the others still run."""
    import traceback

    from megatron_core import parallel_state

    try:
        return fn()
    except Exception:  # noqa: BLE001 - reported by the test of that variant
        parallel_state.destroy_model_parallel()
        return "ERROR " + traceback.format_exc()


def _single_rank_group(rank: int, world: int, prefix: str, tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    logs = {"log_dir": f"{tmp}/logs", "tensorboard_dir": f"{tmp}/tb", "use_wandb": True,
            "wandb_project": "neox-test", "eval_interval": 3, "eval_iters": 1,
            "save": f"{tmp}/ref_ckpt", "checkpoint_factor": 3}
    out["ref"] = _guarded(lambda: run_pretrain(tiny_flat(prefix, **logs), world).losses)
    resume = tiny_flat(prefix, load=f"{tmp}/ref_ckpt/global_step3")
    out["resume"] = _guarded(lambda: run_pretrain(resume, world).losses)
    accum = tiny_flat(prefix, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    out["accum"] = _guarded(lambda: run_pretrain(accum, world).losses)
    bf16 = tiny_flat(prefix, bf16={"enabled": True}, zero_optimization={"stage": 1}, train_iters=12)
    out["bf16"] = _guarded(lambda: run_pretrain(bf16, world).losses)
    Path(f"{tmp}/STOP").touch()
    kill = tiny_flat(prefix, kill_switch_path=f"{tmp}/STOP", save=f"{tmp}/ckpt", checkpoint_factor=100)

    def stopped() -> dict[str, Any]:
        res = run_pretrain(kill, world)
        return {"iteration": res.state.iteration, "reason": res.stop_reason}

    out["kill"] = _guarded(stopped)
    return out


def _two_rank_group(rank: int, world: int, prefix: str) -> dict[str, list[float]]:
    variants = {
        "zero1": {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 2},
        "zero2": {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2},
        "tp2": {"model_parallel_size": 2},
        "pp2": {"pipe_parallel_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2},
    }
    return {name: _guarded(lambda over=over: run_pretrain(tiny_flat(prefix, **over), world).losses)
            for name, over in variants.items()}


def run_groups(tmp: Path, single_rank: Any, two_ranks: Any) -> dict[str, Any]:
    """Build the corpus in ``tmp``, run ``single_rank(rank, world, prefix, tmp)`` on 1 rank and
    ``two_ranks(rank, world, prefix)`` on 2; their results as single (one dict) and double (per rank)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    prefix = make_corpus(tmp)
    single = run_distributed(single_rank, 1, prefix, str(tmp), timeout=600)[0]
    double = run_distributed(two_ranks, 2, prefix, timeout=600)
    return {"tmp": tmp, "single": single, "double": double}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_groups(tmp_path_factory.mktemp("train_parity"), _single_rank_group, _two_rank_group)


def _ok(value: Any) -> Any:
    assert not (isinstance(value, str) and value.startswith("ERROR")), value
    return value


def _close(a: list[float], b: list[float], tol: float = 2e-4) -> None:
    _ok(a), _ok(b)
    assert len(a) == len(b) == STEPS
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= tol * max(1.0, abs(y)), f"step {i + 1}: {x} vs {y}\n{a}\n{b}"


def test_reference_loss_falls(runs):
    ref = _ok(runs["single"]["ref"])
    assert all(math.isfinite(x) for x in ref) and ref[-1] < ref[0]


def test_resume_continues_the_same_losses(runs):
    ref, resumed = _ok(runs["single"]["ref"]), _ok(runs["single"]["resume"])
    assert len(resumed) == STEPS - 3
    for x, y in zip(resumed, ref[3:]):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (resumed, ref)


def test_grad_accumulation_matches(runs):
    _close(runs["single"]["accum"], runs["single"]["ref"])


@pytest.mark.parametrize("name", ["zero1", "zero2", "tp2", "pp2"])
def test_two_ranks_match_single_rank(runs, name):
    ref = runs["single"]["ref"]
    for rank_losses in runs["double"]:
        _ok(rank_losses[name])  # every rank trained
    # rank 0 logs the loss, a mean over the data-parallel ranks (the pipeline's last stage sends it)
    _close(runs["double"][0][name], ref)


def test_bf16_trains(runs):
    losses = _ok(runs["single"]["bf16"])
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1


def test_outputs_written(runs):
    tmp = runs["tmp"]
    lines = [json.loads(x) for x in (tmp / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "split" not in r]
    assert [r["iteration"] for r in train] == list(range(1, STEPS + 1))
    design = {"iteration", "lm_loss", "lr", "grad_norm", "loss_scale", "samples_per_sec", "tokens_per_sec",
              "tflops_per_gpu", "mfu", "consumed_samples", "consumed_tokens", "skipped_iterations",
              "nan_iterations", "max_memory_gib", "elapsed_ms_per_iteration"}
    assert all(design <= set(r) for r in train)
    assert train[-1]["consumed_samples"] == 4 * STEPS and train[-1]["consumed_tokens"] == 4 * STEPS * SEQ
    assert train[0]["grad_norm"] is not None
    # The lr the engine holds after step i is NeoX's cosine schedule at i (warmup 2, decay over 6).
    for r in train:
        i = r["iteration"]
        want = 3e-3 * i / 2 if i <= 2 else 3e-4 + (3e-3 - 3e-4) / 2 * (1 + math.cos(math.pi * (i - 2) / 4))
        assert r["lr"] == pytest.approx(want, rel=1e-6), (i, r["lr"], want)
    assert {r["split"] for r in lines if "split" in r} == {"validation", "test"}
    assert list((tmp / "tb").glob("events.out.tfevents.*"))
    assert list((tmp / "logs" / "wandb").glob("offline-run-*"))


def test_kill_switch_saves_and_stops(runs):
    kill = _ok(runs["single"]["kill"])
    assert kill["iteration"] == 1 and "kill switch" in kill["reason"]
    tmp = runs["tmp"]
    assert (tmp / "ckpt" / "latest").read_text().strip() == "global_step1"
