"""``python deepy.py eval.py CONFIG --eval_tasks T1 T2`` end to end, as the README runs it: the rank started by
deepy.py reads the handed-over config, scores the checkpoint in ``load`` and writes the harness's results
JSON, whose metrics are those of the same tasks run in-process on the same checkpoint (tests/unit/
test_eval_reference.py holds that path against lm_eval's own HF backend)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from tests.distributed.launch import free_port  # noqa: E402
from tests.unit import eval_helpers as H  # noqa: E402

TASKS = ["arith_mc", "arith_gen"]


def test_deepy_eval_py_scores_the_checkpoint(tmp_path):
    H.offline()
    ckpt, _ = H.make_checkpoints(tmp_path)
    tasks = H.task_dir(tmp_path)
    conf = {**H.model_flat(), "num_gpus": 1, "master_port": free_port(), "load": ckpt,
            "eval_tasks_include_path": [tasks], "eval_limit": 4, "log_dir": str(tmp_path / "logs"),
            "eval_results_prefix": str(tmp_path / "results" / "run")}
    (tmp_path / "eval.yml").write_text(json.dumps(conf))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "deepy.py", "eval.py", str(tmp_path / "eval.yml"), "--eval_tasks", *TASKS],
                          cwd=H.ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "results" / "run_eval_results_*.json"))
    with open(path, encoding="utf-8") as f:
        got = json.load(f)["results"]

    lm, _ = H.neox_lm(ckpt)
    ref = H.evaluate(lm, tasks, TASKS, limit=4)["results"]
    for task in TASKS:
        for key, value in ref[task].items():
            if isinstance(value, float):
                assert got[task][key] == pytest.approx(value, rel=1e-6), (task, key)
    assert "arith_mc" in proc.stdout  # the harness's table
