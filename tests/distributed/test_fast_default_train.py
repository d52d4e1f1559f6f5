"""pretrain() of a GPT-NeoX-style bf16 config that leaves the optimizer path to neox (no
``optimizer_master_weights`` key, ``precision: bfloat16``, ``data_types.grad_accum_dtype: fp32``), on
CPU ranks: neox takes its bf16-parameter / fp32-master path by itself, at data parallel 1 and, at
ZeRO stage 0, at data parallel 2 (replicated masters).

References: gradient accumulation 2 x micro-batch 2 against one micro-batch of 4 on one rank (the fp32
gradient sums), and 2 data-parallel ranks against the 1-rank run with the same global batch (4), with
and without accumulation (the optimizer's own fp32 all-reduce of the sums). Everything computes in
bf16, so the curves agree to bf16 tolerance, not bit for bit.
"""

from __future__ import annotations

import math

import pytest

from tests.distributed.test_train_parity import _guarded, _ok, run_groups, run_pretrain, tiny_flat

STEPS = 8
NEOX_BF16 = {"precision": "bfloat16", "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
             "train_iters": STEPS}


def _one_rank(rank: int, world: int, prefix: str, tmp: str) -> dict:
    ref = tiny_flat(prefix, **NEOX_BF16, save=f"{tmp}/ckpt", checkpoint_factor=STEPS)
    accum = tiny_flat(prefix, **NEOX_BF16, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    # as GPT-NeoX configs write it: ZeRO 1 (at data parallel 1 the same path as stage 0)
    zero1 = tiny_flat(prefix, **NEOX_BF16, zero_optimization={"stage": 1})
    # the same config on DeepSpeed's bf16 optimizer (ZeRO 1: DeepSpeed refuses fp32 accumulation at 0)
    deepspeed = tiny_flat(prefix, **NEOX_BF16, optimizer_master_weights=False, zero_optimization={"stage": 1})
    bf16_sums = tiny_flat(prefix, **{**NEOX_BF16, "data_types": {"grad_accum_dtype": "bf16"}},
                          train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    return {"ref": _guarded(lambda: run_pretrain(ref, world).losses),
            "accum": _guarded(lambda: run_pretrain(accum, world).losses),
            "accum_bf16": _guarded(lambda: run_pretrain(bf16_sums, world).losses),
            "accum_bf16_gemm": _guarded(lambda: _with_gemm_accumulation(lambda: run_pretrain(bf16_sums, world).losses)),
            "zero1": _guarded(lambda: run_pretrain(zero1, world).losses),
            "deepspeed": _guarded(lambda: run_pretrain(deepspeed, world).losses)}


def _with_gemm_accumulation(fn):
    import os
    from unittest import mock

    from neox.config.fast_path import GEMM_ACCUMULATION_SWITCH

    with mock.patch.dict(os.environ, {GEMM_ACCUMULATION_SWITCH: "1"}):
        return fn()


def _two_ranks(rank: int, world: int, prefix: str) -> dict:
    layouts = {"dp2": {"train_micro_batch_size_per_gpu": 2},
               "dp2_accum": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2}}
    return {name: _guarded(lambda over=over: run_pretrain(tiny_flat(prefix, **NEOX_BF16, **over), world).losses)
            for name, over in layouts.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_groups(tmp_path_factory.mktemp("fast_default"), _one_rank, _two_ranks)


def _close(a: list[float], b: list[float], tol: float) -> None:
    assert len(a) == len(b) == STEPS
    for x, y in zip(a, b):
        assert math.isfinite(x) and abs(x - y) <= tol * abs(y), (a, b)


def test_takes_the_master_weight_path_by_itself(runs):
    import torch

    losses = _ok(runs["single"]["ref"])
    assert losses[-1] < losses[0] - 0.5
    saved = torch.load(runs["tmp"] / "ckpt" / f"global_step{STEPS}" / "mp_rank_00_model_states.pt",
                       weights_only=False)
    assert {t.dtype for t in saved["module"].values()} == {torch.bfloat16}
    state = saved["optimizer"]["state"]
    assert state and all(s["master"].dtype == torch.float32 for s in state.values())


def test_zero1_at_data_parallel_1_is_the_same_path(runs):
    assert _ok(runs["single"]["zero1"]) == _ok(runs["single"]["ref"])


def test_matches_deepspeeds_bf16_optimizer(runs):
    """Same math (bf16 compute, fp32 masters, fp32 accumulation) as the path it replaces."""
    _close(_ok(runs["single"]["ref"]), _ok(runs["single"]["deepspeed"]), 5e-3)


def test_fp32_accumulation_matches_one_micro_batch_of_twice_the_size(runs):
    _close(_ok(runs["single"]["accum"]), _ok(runs["single"]["ref"]), 5e-3)


def test_bf16_sums_inside_the_gemms_match_autograds_bf16_sums(runs):
    """NEOX_GEMM_GRAD_ACCUMULATION=1 under DeepSpeed's engine: the same curve as autograd's bf16 sums
    (each sum is rounded to bf16 once instead of twice, so not bit for bit)."""
    _close(_ok(runs["single"]["accum_bf16_gemm"]), _ok(runs["single"]["accum_bf16"]), 5e-3)


@pytest.mark.parametrize("layout", ["dp2", "dp2_accum"])
def test_two_data_parallel_ranks_match_one_rank(runs, layout):
    ref = _ok(runs["single"]["ref"])
    for rank in runs["double"]:
        _ok(rank[layout])  # every rank trained
    _close(runs["double"][0][layout], ref, 5e-3)  # rank 0 logs the loss (a data-parallel mean)
