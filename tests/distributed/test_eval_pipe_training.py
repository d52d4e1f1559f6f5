"""eval_tasks during pipeline-parallel training (PP 2 on two gloo CPU ranks): every stage is sent the
other stage's parameters for the evaluation (neox.eval.training.plain_model), so the in-training scores
at the end are eval.py's on the run's last checkpoint, loaded into the plain model on the same two ranks
(data parallel 2, the requests split), and the training losses are the PP 2 run's without eval_tasks."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from typing import Any

import pytest

pytest.importorskip("lm_eval")

from tests.distributed.launch import run_distributed  # noqa: E402
from tests.distributed.test_train_parity import STEPS, make_corpus, release_groups, run_pretrain, tiny_flat  # noqa: E402
from tests.unit import eval_helpers as H  # noqa: E402

TASKS = ["arith_mc", "arith_gen"]


def _records(log_dir: str) -> list[dict[str, Any]]:
    with open(f"{log_dir}/metrics.jsonl", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r.get("split") == "eval_tasks"]


def _group(rank: int, world: int, prefix: str, tasks: str, tmp: str) -> dict[str, Any]:
    from neox.config import NeoXArgs

    H.offline()
    on = {"eval_tasks": TASKS, "eval_tasks_include_path": [tasks], "eval_limit": 4, "eval_batch_size": 4,
          "eval_bootstrap_iters": 0}
    pipe = {"pipe_parallel_size": 2}
    out: dict[str, Any] = {"off": run_pretrain(tiny_flat(prefix, **pipe), world).losses}
    out["on"] = run_pretrain(tiny_flat(prefix, **pipe, **on, save=f"{tmp}/ckpt", checkpoint_factor=STEPS,
                                       log_dir=f"{tmp}/logs_on"), world).losses
    spec = importlib.util.spec_from_file_location("neox_eval_entry", H.ROOT / "eval.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    # DP 2 for eval.py: the training batch of 4 splits into micro-batches of 2 (only the batch keys check it)
    flat = tiny_flat(prefix, **on, save=f"{tmp}/ckpt", log_dir=f"{tmp}/logs_eval", train_micro_batch_size_per_gpu=2)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            entry.run(NeoXArgs.from_flat(flat, world_size=world))
    finally:
        release_groups()
    if rank == 0:
        out["on_records"] = _records(f"{tmp}/logs_on")
        out["eval_records"] = _records(f"{tmp}/logs_eval")
    return out


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_pipe")
    return run_distributed(_group, 2, make_corpus(tmp), H.task_dir(tmp), str(tmp), timeout=400)[0]


def test_pipeline_run_scores_its_last_checkpoint_as_eval_py_does(group):
    (rec,) = group["on_records"]  # eval_interval is past the run: the tasks run once, at the end
    assert rec["iteration"] == STEPS and {"arith_mc/acc", "arith_gen/exact_match"} <= set(rec)
    (ref,) = group["eval_records"]
    assert rec == {**ref, "iteration": STEPS}


def test_pipeline_losses_unchanged_by_eval_tasks(group):
    assert len(group["off"]) == STEPS and group["on"] == group["off"]
