"""Full-training resume through pretrain(): N iterations uninterrupted == N/2, save, resume to N.

fp32 on CPU, so the comparison is exact on the same layout: 1 rank (with the forward-pass
validation of the checkpoint on), 2 ranks with ZeRO-1 DP 2, and 2 ranks with pipeline parallel 2;
with dropout on too (hidden and attention 0.1) on 1 rank and at tensor parallel 2, whose attention
dropout draws from the tracker's per-rank stream, so the restored RNG streams must be exactly the saved ones.
Also: a 1-rank checkpoint resumed at data-parallel size 2, and a ZeRO-1 DP-2 checkpoint resumed at
DP 1, continue as the uninterrupted run did (within the DP-parity tolerance of test_train_parity),
and ``finetune`` restarts at iteration 0 from the trained weights.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from tests.distributed.launch import run_distributed
from tests.distributed.test_train_parity import _guarded, make_corpus, run_pretrain, tiny_flat

HALF, FULL = 3, 6
DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.1}


def _resume(prefix: str, ckpt: str, world: int, **over: Any) -> dict[str, Any]:
    ref = run_pretrain(tiny_flat(prefix, train_iters=FULL, **over), world).losses
    first = run_pretrain(tiny_flat(prefix, train_iters=FULL, save=ckpt, checkpoint_factor=HALF,
                                   exit_interval=HALF, **over), world)
    second = run_pretrain(tiny_flat(prefix, train_iters=FULL, save=ckpt, load=ckpt, checkpoint_factor=HALF,
                                    **over), world)
    return {"ref": ref, "first": first.losses, "first_iter": first.state.iteration, "second": second.losses,
            "second_state": second.state.to_dict()}


def _one_rank(rank: int, world: int, prefix: str, tmp: str) -> dict[str, Any]:
    out = {"fp32": _guarded(lambda: _resume(prefix, f"{tmp}/r1", world,
                                            checkpoint_validation_with_forward_pass=True)),
           # eval_interval HALF: the checkpoint's iteration is evaluated too, after the save
           "dropout": _guarded(lambda: _resume(prefix, f"{tmp}/drop", world, eval_interval=HALF, **DROPOUT))}
    shutil.copytree(f"{tmp}/r1/global_step{HALF}", f"{tmp}/r1_half/global_step{HALF}")
    with open(f"{tmp}/r1_half/latest", "w") as f:
        f.write(f"global_step{HALF}")

    def finetune() -> dict[str, Any]:
        res = run_pretrain(tiny_flat(prefix, train_iters=2, load=f"{tmp}/r1", finetune=True, save=f"{tmp}/ft"), world)
        return {"losses": res.losses, "iteration": res.state.iteration}

    out["finetune"] = _guarded(finetune)
    return out


def _two_ranks(rank: int, world: int, prefix: str, tmp: str) -> dict[str, Any]:
    zero1 = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 2}
    pp2 = {"pipe_parallel_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}
    out = {"zero1": _guarded(lambda: _resume(prefix, f"{tmp}/z1", world, **zero1)),
           "pp2": _guarded(lambda: _resume(prefix, f"{tmp}/pp2", world, **pp2)),
           "tp2_dropout": _guarded(lambda: _resume(prefix, f"{tmp}/tp2d", world, model_parallel_size=2, **DROPOUT))}
    dp2 = tiny_flat(prefix, train_iters=FULL, load=f"{tmp}/r1_half", save=f"{tmp}/dp2",
                    train_micro_batch_size_per_gpu=2)
    out["dp_change"] = _guarded(lambda: run_pretrain(dp2, world).losses)
    return out


def _zero1_dp2_to_dp1(rank: int, world: int, prefix: str, tmp: str) -> Any:
    flat = tiny_flat(prefix, train_iters=FULL, load=f"{tmp}/z1/global_step{HALF}", save=f"{tmp}/z1_dp1",
                     zero_optimization={"stage": 1})
    return _guarded(lambda: run_pretrain(flat, world).losses)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    prefix = make_corpus(tmp)
    one = run_distributed(_one_rank, 1, prefix, str(tmp), timeout=600)[0]
    two = run_distributed(_two_ranks, 2, prefix, str(tmp), timeout=600)[0]
    back = run_distributed(_zero1_dp2_to_dp1, 1, prefix, str(tmp), timeout=600)[0]
    return {"tmp": tmp, "one": one, "two": two, "zero1_dp1": back}


def _ok(value: Any) -> Any:
    assert not (isinstance(value, str) and value.startswith("ERROR")), value
    return value


@pytest.mark.parametrize("group,name", [("one", "fp32"), ("two", "zero1"), ("two", "pp2"), ("one", "dropout"),
                                        ("two", "tp2_dropout")])
def test_resume_is_exact(runs, group, name):
    r = _ok(runs[group][name])
    assert r["first_iter"] == HALF and len(r["first"]) == HALF and len(r["second"]) == FULL - HALF
    assert r["first"] + r["second"] == r["ref"]  # bitwise: fp32 on CPU
    assert r["second_state"]["iteration"] == FULL
    assert r["second_state"]["consumed_train_samples"] == FULL * 4


def test_dropout_is_on(runs):
    """The dropout runs draw masks: their losses are not the dropout-free run's (else the case proves nothing)."""
    plain = _ok(runs["one"]["fp32"])["ref"]
    for group, name in [("one", "dropout"), ("two", "tp2_dropout")]:
        ref = _ok(runs[group][name])["ref"]
        assert all(x != y for x, y in zip(ref, plain)), name


def test_layouts_on_disk(runs):
    tmp = runs["tmp"]
    assert (tmp / "r1" / "latest").read_text() == f"global_step{FULL}"
    names = set(os.listdir(tmp / "pp2" / f"global_step{FULL}"))
    assert {"layer_00-model_00-model_states.pt", "mp_rank_00_model_states.pt", "rng_state_rank1.pt",
            "manifest.json"} <= names


def test_resume_at_other_dp_size(runs):
    ref = _ok(runs["one"]["fp32"])["ref"]
    got = _ok(runs["two"]["dp_change"])
    assert len(got) == FULL - HALF
    for i, (x, y) in enumerate(zip(got, ref[HALF:])):
        assert abs(x - y) <= 2e-4 * max(1.0, abs(y)), f"step {HALF + i + 1}: {x} vs {y}"


def test_finetune_restarts_from_weights(runs):
    ft = _ok(runs["one"]["finetune"])
    ref = _ok(runs["one"]["fp32"])["ref"]
    assert ft["iteration"] == 2 and (runs["tmp"] / "ft" / "latest").read_text() == "global_step2"
    # same first batch as the reference's first step, but trained weights: a much lower loss
    assert ft["losses"][0] < ref[0] - 0.5


def test_zero1_resume_at_other_dp_size_keeps_optimizer(runs):
    """ZeRO-1 state saved at DP 2 resharded to DP 1 (universal checkpoint): the run continues as the
    DP-2 run did; a reset optimizer would diverge far beyond this tolerance."""
    ref = _ok(runs["two"]["zero1"])["ref"]
    got = _ok(runs["zero1_dp1"])
    assert len(got) == FULL - HALF
    for i, (x, y) in enumerate(zip(got, ref[HALF:])):
        assert abs(x - y) <= 2e-4 * max(1.0, abs(y)), f"step {HALF + i + 1}: {x} vs {y}"
