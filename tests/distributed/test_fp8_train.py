"""pretrain() with FP8 block linears (torchao emulation, CPU, gloo, gradient clipping 1.0): tensor
parallel 2 gives the single-rank FP8 losses, ZeRO 1 and 3 give ZeRO 0's, and a resumed FP8 run
continues the uninterrupted run's losses.

References: the same FP8 config on one rank (TP), the same FP8 config at ZeRO 0 on the same two
ranks (ZeRO: data parallelism splits the batch, so each rank's activation scales come from its own
half, as at ZeRO 0), the uninterrupted run (resume), and the fp32 run (FP8 rounding is really there).

Tolerances. FP8 casts round to 3 mantissa bits (e4m3: ~6% per element), so FP8 vs fp32 differs
by ~5e-4 in the loss here. Tensor-parallel ranks take every split tensor's amax over the group
(neox/model/fp8.py), so TP 2 casts each element with TP 1's scale; what is left is fp32 summation
order (the row-parallel all-reduce, shorter GEMM inner dims). Measured: TP 2 == TP 1 exactly for
tensorwise, 6e-7 for rowwise; with per-shard scales (no amax reduction) tensorwise was 2.5e-4 off,
half the FP8 vs fp32 gap. 2e-5 sits between the two, so the test fails if the reduction is lost.
CPU training runs stay eager, so a column + row parallel FP8 pair is also compiled on the two ranks
(the amax all-reduces inside the graph) and held against the eager pair and one unsplit rank. ZeRO only partitions
optimizer state, gradients and parameters: the fp32 parity tolerance (2e-4; measured 0). Resume:
1e-5 as the fp32 resume test (measured 0).
"""

from __future__ import annotations

import math

import pytest

from tests.distributed.test_train_parity import STEPS, _guarded, _ok, run_groups, run_pretrain, tiny_flat

pytest.importorskip("torchao.float8")

FP8 = {"fp8_emulate": True}
TP_TOL, ZERO_TOL, RESUME_TOL = 2e-5, 2e-4, 1e-5


def _one_rank(rank: int, world: int, prefix: str, tmp: str) -> dict:
    out = {}
    for recipe in ("tensorwise", "rowwise"):
        save = {"save": f"{tmp}/{recipe}", "checkpoint_factor": 3} if recipe == "tensorwise" else {}
        out[recipe] = _guarded(lambda r=recipe, s=save: run_pretrain(tiny_flat(prefix, fp8_recipe=r, **FP8, **s), world).losses)
    resume = tiny_flat(prefix, fp8_recipe="tensorwise", **FP8, load=f"{tmp}/tensorwise/global_step3")
    out["resume"] = _guarded(lambda: run_pretrain(resume, world).losses)
    out["fp32"] = _guarded(lambda: run_pretrain(tiny_flat(prefix), world).losses)
    return out


def _two_ranks(rank: int, world: int, prefix: str) -> dict:
    dp = {"train_micro_batch_size_per_gpu": 2, "fp8_recipe": "tensorwise"}
    variants = {
        "tp2_tensorwise": {"model_parallel_size": 2, "fp8_recipe": "tensorwise"},
        "tp2_rowwise": {"model_parallel_size": 2, "fp8_recipe": "rowwise"},
        **{f"zero{stage}_tensorwise": {"zero_optimization": {"stage": stage}, **dp} for stage in (0, 1, 3)},
    }
    out = {name: _guarded(lambda over=over: run_pretrain(tiny_flat(prefix, **over, **FP8), world).losses)
           for name, over in variants.items()}
    return {**out, "compiled_pair": _guarded(lambda: _tp_pair(rank, world))}


def _tp_pair(rank: int, world: int) -> dict[str, float]:
    """x -> ColumnParallel(96) -> RowParallel(64), FP8 tensorwise, split over the two ranks: eager and
    compiled, against the unsplit pair on every rank (largest absolute differences, output and grads)."""
    import torch
    import torch.distributed as dist

    from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from neox.config.compat import fp8_plan
    from neox.config.optim import PrecisionConfig
    from neox.model.fp8 import fp8_linear_fn

    plan = fp8_plan(PrecisionConfig(fp8_recipe="tensorwise", fp8_emulate=True))
    torch.manual_seed(0)
    x, w1, w2, g = torch.randn(2, 8, 64), torch.randn(96, 64), torch.randn(64, 96), torch.randn(2, 8, 64)
    cut = slice(rank * 48, (rank + 1) * 48)
    group = dist.group.WORLD
    col, row = ColumnParallelLinear(64, 96, bias=False, group=group), RowParallelLinear(96, 64, bias=False, group=group)
    with torch.no_grad():
        col.weight.copy_(w1[cut]), row.weight.copy_(w2[:, cut])
    col.linear_fn, row.linear_fn = fp8_linear_fn(plan, "column", group), fp8_linear_fn(plan, "row", group)

    def grads(fn, *params):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(g)
        found = [y.detach(), xi.grad] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return found

    one = fp8_linear_fn(plan)
    a, b = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    ref = grads(lambda t: one(one(t, a), b), a, b)
    ref = ref[:2] + [ref[2][cut], ref[3][:, cut]]
    eager = grads(lambda t: row(col(t)), col.weight, row.weight)
    compiled = grads(torch.compile(lambda t: row(col(t))), col.weight, row.weight)
    worst = lambda u, v: max((p - q).abs().max().item() / q.abs().max().item() for p, q in zip(u, v))  # noqa: E731
    return {"eager_vs_one": worst(eager, ref), "compiled_vs_eager": worst(compiled, eager)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_groups(tmp_path_factory.mktemp("fp8_train"), _one_rank, _two_ranks)


def _max_rel(a: list[float], b: list[float]) -> float:
    _ok(a), _ok(b)
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_trains_and_differs_from_fp32(runs, recipe):
    fp8, fp32 = _ok(runs["single"][recipe]), _ok(runs["single"]["fp32"])
    assert all(math.isfinite(x) for x in fp8) and fp8[-1] < fp8[0]
    assert 1e-5 < _max_rel(fp8, fp32) < 5e-2  # FP8 rounding is there, and small


def _all_ranks_trained(runs) -> None:
    for rank in runs["double"]:
        for value in rank.values():
            _ok(value)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_tensor_parallel_2_matches_one_rank(runs, recipe):
    ref, fp32 = runs["single"][recipe], runs["single"]["fp32"]
    gap = _max_rel(ref, fp32)
    _all_ranks_trained(runs)
    for rank_losses in runs["double"][:1]:  # rank 0 logs the losses (data-parallel means)
        diff = _max_rel(rank_losses[f"tp2_{recipe}"], ref)
        assert diff < TP_TOL and diff < gap / 20, (diff, gap, rank_losses[f"tp2_{recipe}"], ref)


def test_fp8_tensor_parallel_pair_compiles(runs):
    """Differences relative to each tensor's largest value."""
    for rank in runs["double"]:
        pair = _ok(rank["compiled_pair"])
        assert pair["eager_vs_one"] < 1e-5 and pair["compiled_vs_eager"] < 1e-5, pair


@pytest.mark.parametrize("stage", [1, 3])
def test_fp8_zero_matches_zero_0(runs, stage):
    _all_ranks_trained(runs)
    for rank_losses in runs["double"][:1]:  # rank 0 logs the losses (data-parallel means)
        ref = _ok(rank_losses["zero0_tensorwise"])
        assert _max_rel(rank_losses[f"zero{stage}_tensorwise"], ref) < ZERO_TOL, (rank_losses, ref)


def test_fp8_data_parallel_stays_near_one_rank(runs):
    """Half-batch activation scales round differently from the full batch's: near, not equal."""
    ref, fp32 = runs["single"]["tensorwise"], runs["single"]["fp32"]
    _all_ranks_trained(runs)
    for rank_losses in runs["double"][:1]:  # rank 0 logs the losses (data-parallel means)
        assert _max_rel(rank_losses["zero0_tensorwise"], ref) < max(5e-3, 3 * _max_rel(ref, fp32))


def test_fp8_resume_is_exact(runs):
    ref, resumed = _ok(runs["single"]["tensorwise"]), _ok(runs["single"]["resume"])
    assert len(resumed) == STEPS - 3
    for x, y in zip(resumed, ref[3:]):
        assert abs(x - y) <= RESUME_TOL * max(1.0, abs(y)), (resumed, ref)
