"""eval_tasks in training and eval.py, in one spawned 1-rank process (gloo): the tasks run at
eval_interval and at the end, one metrics.jsonl record each with "<task>/<metric>" keys; the training
losses are those of the same run without eval_tasks, and a resume with them on continues those losses.
eval.py then evaluates the latest checkpoint under ``save``: the results JSON, per-sample files,
the harness's table and a metrics.jsonl record."""

from __future__ import annotations

import contextlib
import glob
import io
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lm_eval")

from tests.distributed.launch import run_distributed  # noqa: E402
from tests.distributed.test_train_parity import STEPS, make_corpus, run_pretrain, tiny_flat  # noqa: E402
from tests.unit import eval_helpers as H  # noqa: E402

TASKS = ["arith_mc", "arith_gen"]


def _records(log_dir: str) -> list[dict[str, Any]]:
    with open(f"{log_dir}/metrics.jsonl", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r.get("split") == "eval_tasks"]


def _tb_tags(tb_dir: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return sorted(acc.Tags()["scalars"])


def _group(rank: int, world: int, prefix: str, tasks: str, tmp: str) -> dict[str, Any]:
    import importlib.util

    from neox.config import NeoXArgs

    H.offline()
    base = {"eval_interval": 4, "eval_iters": 1, "hidden_dropout": 0.1}  # dropout: the torch RNG matters
    on = {**base, "eval_tasks": TASKS, "eval_tasks_include_path": [tasks], "eval_limit": 4,
          "eval_batch_size": 4, "eval_bootstrap_iters": 0}
    out: dict[str, Any] = {"off": run_pretrain(tiny_flat(prefix, **base), world).losses}
    out["on"] = run_pretrain(tiny_flat(prefix, **on, save=f"{tmp}/ckpt", checkpoint_factor=3,
                                       log_dir=f"{tmp}/logs_on"), world).losses
    out["on_records"] = _records(f"{tmp}/logs_on")
    out["resumed"] = run_pretrain(tiny_flat(prefix, **on, load=f"{tmp}/ckpt/global_step3",
                                            log_dir=f"{tmp}/logs_resume"), world).losses
    out["resume_records"] = _records(f"{tmp}/logs_resume")
    out["resumed_off"] = run_pretrain(tiny_flat(prefix, **base, load=f"{tmp}/ckpt/global_step3"), world).losses

    spec = importlib.util.spec_from_file_location("neox_eval_entry", H.ROOT / "eval.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    flat = tiny_flat(prefix, **on, save=f"{tmp}/ckpt", log_dir=f"{tmp}/logs_eval", eval_log_samples=True,
                     eval_results_prefix=f"{tmp}/results/run1", tensorboard_dir=f"{tmp}/tb_eval")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        res = entry.run(NeoXArgs.from_flat(flat, world_size=world))
    out["eval_results"] = res["results"]
    out["eval_stdout"] = stdout.getvalue()
    out["eval_records"] = _records(f"{tmp}/logs_eval")
    out["files"] = sorted(Path(p).name for p in glob.glob(f"{tmp}/results/*"))
    out["tb_tags"] = _tb_tags(f"{tmp}/tb_eval")
    with open(glob.glob(f"{tmp}/results/run1_eval_results_*.json")[0], encoding="utf-8") as f:
        out["json"] = json.load(f)
    return out


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_train")
    tasks = H.task_dir(tmp)
    return run_distributed(_group, 1, make_corpus(tmp), tasks, str(tmp), timeout=400)[0]


def test_training_losses_unchanged_by_eval_tasks(group):
    assert len(group["off"]) == STEPS
    assert group["on"] == group["off"]  # bit for bit: RNG streams and train mode restored
    # a resume continues as it does without eval_tasks (the checkpoint's RNG state is not the tasks')
    assert len(group["resumed"]) == STEPS - 3 and group["resumed"] == group["resumed_off"]
    assert group["resumed"] == group["off"][3:]  # and as the uninterrupted run did (dropout: RNG restored)


def test_eval_tasks_logged_at_interval_and_end(group):
    recs = group["on_records"]
    assert [r["iteration"] for r in recs] == [4, STEPS]
    for r in recs:
        assert {"arith_mc/acc", "arith_mc/acc_norm", "arith_gen/exact_match"} <= set(r)
        assert 0.0 <= r["arith_mc/acc"] <= 1.0
    assert [r["iteration"] for r in group["resume_records"]] == [4, STEPS]
    # the resumed run's weights at step 4 and 6 are the first run's: the same scores
    assert group["resume_records"] == recs


def test_eval_py_writes_results_samples_table_and_record(group):
    files = group["files"]
    stamp = next(f for f in files if f.startswith("run1_eval_results_")).removeprefix("run1_eval_results_")
    stamp = stamp.removesuffix(".json")
    assert sorted(files) == sorted([f"run1_eval_results_{stamp}.json", f"samples_arith_mc_{stamp}.jsonl",
                                    f"samples_arith_gen_{stamp}.jsonl"])
    assert set(group["json"]["results"]) == set(TASKS) and "samples" not in group["json"]
    assert group["json"]["results"]["arith_mc"]["acc,none"] == group["eval_results"]["arith_mc"]["acc,none"]
    assert "arith_mc" in group["eval_stdout"] and "|" in group["eval_stdout"]  # the harness's table
    (rec,) = group["eval_records"]
    assert rec["iteration"] == STEPS  # the checkpoint evaluated: the latest under save
    assert {"eval_tasks/arith_mc/acc", "eval_tasks/arith_gen/exact_match"} <= set(group["tb_tags"])
    # the latest checkpoint is the trained run's last weights: the in-training scores at the end
    assert rec == {**group["on_records"][-1], "iteration": STEPS}
