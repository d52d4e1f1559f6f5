"""lm-eval on two gloo CPU ranks: TP 2 (vocab-parallel logits gathered, tokens agreed) and DP 2 (the
requests split between the ranks, gathered on rank 0) give a single-rank run's per-request
loglikelihoods (within 1e-4), greedy generations and metrics on the offline fixture tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from tests.distributed.launch import run_distributed  # noqa: E402
from tests.unit import eval_helpers as H  # noqa: E402

TOL = 1e-4


def _worker(rank: int, world: int, ckpt: str, tasks: str, tp: int) -> dict | None:
    from megatron_core import parallel_state

    H.offline()
    parallel_state.initialize_model_parallel(tp, 1)
    try:
        lm, _ = H.neox_lm(ckpt, model_parallel_size=tp, world_size=world)
        res = H.evaluate(lm, tasks)
        if res is None:
            return None
        return {"results": res["results"], "samples": {t: H.per_request(res, t) for t in H.TASKS},
                "dp": (lm.rank, lm.world_size)}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    H.offline()
    root = Path(tmp_path_factory.mktemp("eval_par"))
    ckpt, _ = H.make_checkpoints(root)
    tasks = H.task_dir(root)
    lm, _ = H.neox_lm(ckpt)
    res = H.evaluate(lm, tasks)
    return ckpt, tasks, {"results": res["results"], "samples": {t: H.per_request(res, t) for t in H.TASKS}}


def _lls(resps) -> list[float]:
    return [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in resps]


def _same_as_single(got: dict, ref: dict) -> None:
    for task in ("arith_mc", "arith_ppl"):
        assert len(got["samples"][task]) == len(ref["samples"][task]) == 12
        for (a_args, a), (b_args, b) in zip(got["samples"][task], ref["samples"][task], strict=True):
            assert a_args == b_args
            assert _lls(a) == pytest.approx(_lls(b), abs=TOL, rel=0)
    assert got["samples"]["arith_gen"] == ref["samples"]["arith_gen"]
    for task in H.TASKS:
        for k, v in ref["results"][task].items():
            if isinstance(v, float):
                assert got["results"][task][k] == pytest.approx(v, rel=1e-5), (task, k)


def test_tensor_parallel_2_matches_one_rank(single):
    ckpt, tasks, ref = single
    out = run_distributed(_worker, 2, ckpt, tasks, 2, timeout=240)
    assert out[1] is None  # the harness reports on the replica's first rank only (LOCAL_RANK 0)
    assert out[0]["dp"] == (0, 1)  # one replica: both ranks ran every request
    _same_as_single(out[0], ref)


def test_data_parallel_2_matches_one_rank(single):
    ckpt, tasks, ref = single
    out = run_distributed(_worker, 2, ckpt, tasks, 1, timeout=240)
    assert out[1] is None  # the harness gathers the results on rank 0
    assert out[0]["dp"] == (0, 2)
    _same_as_single(out[0], ref)
