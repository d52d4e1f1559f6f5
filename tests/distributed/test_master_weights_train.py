"""pretrain() with ``optimizer_master_weights`` (bf16 parameters, fp32 masters in the optimizer)
against the run it replaces, fp32 parameters under bf16 autocast, on CPU ranks.

Both compute in bf16; they differ only by the first rounding of the initial weights to bf16 and
by norm-weight gradients rounded to bf16, so the loss curves agree to bf16 tolerance. A resume
from a checkpoint must continue the uninterrupted curve exactly (the fp32 masters are saved with
the optimizer state), and tensor or data parallel 2 must match one rank.
"""

from __future__ import annotations

import math

import pytest

from tests.distributed.test_train_parity import _guarded, _ok, run_groups, run_pretrain, tiny_flat

STEPS = 10
AUTOCAST = {"precision": "fp32", "torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "train_iters": STEPS}
MASTER = {**AUTOCAST, "optimizer_master_weights": True}


def _one_rank(rank: int, world: int, prefix: str, tmp: str) -> dict:
    out = {"autocast": _guarded(lambda: run_pretrain(tiny_flat(prefix, **AUTOCAST), world).losses)}

    master = tiny_flat(prefix, **MASTER, save=f"{tmp}/ckpt", checkpoint_factor=5)
    out["master"] = _guarded(lambda: run_pretrain(master, world).losses)
    out["resume"] = _guarded(lambda: run_pretrain(tiny_flat(prefix, **MASTER, load=f"{tmp}/ckpt/global_step5"),
                                                  world).losses)
    # the same checkpoint resumed with the key off: fp32 parameters under autocast, masters adopted
    out["resume_off"] = _guarded(lambda: run_pretrain(tiny_flat(prefix, **AUTOCAST, load=f"{tmp}/ckpt/global_step5"),
                                                      world).losses)
    return out


def _two_ranks(rank: int, world: int, prefix: str) -> dict:
    layouts = {"tp2": {"model_parallel_size": 2}, "dp2": {"train_micro_batch_size_per_gpu": 2}}
    return {name: _guarded(lambda over=over: run_pretrain(tiny_flat(prefix, **MASTER, **over), world).losses)
            for name, over in layouts.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_groups(tmp_path_factory.mktemp("master_weights"), _one_rank, _two_ranks)


def _close(a: list[float], b: list[float], tol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert math.isfinite(x) and abs(x - y) <= tol * abs(y), (a, b)


def test_matches_fp32_parameters_under_autocast(runs):
    master, ref = _ok(runs["single"]["master"]), _ok(runs["single"]["autocast"])
    _close(master, ref, 2e-3)  # measured: within 1.2e-4 over 10 steps
    assert master[-1] < master[0] - 0.5  # and it learns


def test_resume_continues_the_same_losses(runs):
    master, resumed = _ok(runs["single"]["master"]), _ok(runs["single"]["resume"])
    assert len(resumed) == STEPS - 5
    _close(resumed, master[5:], 1e-5)


def test_resume_with_the_key_off_continues(runs):
    master, resumed = _ok(runs["single"]["master"]), _ok(runs["single"]["resume_off"])
    _close(resumed, master[5:], 2e-3)


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_two_ranks_match_one_rank(runs, layout):
    """Tensor parallel 2, and data parallel 2 (DeepSpeed's ZeRO-0 all-reduce of bf16 gradients)."""
    master = _ok(runs["single"]["master"])
    for rank in runs["double"]:
        _ok(rank[layout])  # every rank trained
    _close(runs["double"][0][layout], master, 5e-3)  # rank 0 logs the loss (a data-parallel mean)


def test_checkpoint_holds_bf16_weights_and_fp32_masters(runs):
    import torch

    _ok(runs["single"]["master"])
    saved = torch.load(runs["tmp"] / "ckpt" / "global_step5" / "mp_rank_00_model_states.pt", weights_only=False)
    assert {t.dtype for t in saved["module"].values()} == {torch.bfloat16}
    state = saved["optimizer"]["state"]
    assert state and all(s["master"].dtype == torch.float32 and s["exp_avg"].dtype == torch.float32
                         for s in state.values())
