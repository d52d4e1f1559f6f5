"""eval keys: parsed into EvalConfig (and --eval_tasks on deepy's command line), one-line errors for a
missing lm_eval, unknown tasks, a bad include path and no checkpoint; the metrics record's keys."""

from __future__ import annotations

import sys

import pytest

from neox.config import NeoXArgs
from neox.config.run import CheckpointConfig, EvalConfig
from neox.errors import ConfigError
from tests.unit import eval_helpers as H


def _one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_keys_parse_into_eval_section():
    args = NeoXArgs.from_flat(H.model_flat(eval_tasks=["arith_mc"], eval_num_fewshot=2, eval_limit=0.5,
                                           eval_log_samples=True, eval_results_prefix="out/x"), world_size=1)
    assert args.eval == EvalConfig(eval_tasks=["arith_mc"], eval_num_fewshot=2, eval_limit=0.5, eval_batch_size=4,
                                   eval_bootstrap_iters=0, eval_log_samples=True, eval_results_prefix="out/x")
    assert NeoXArgs.from_flat(H.model_flat(), world_size=1).eval.eval_limit is None  # no limit=10


def _entry():
    import importlib.util

    spec = importlib.util.spec_from_file_location("neox_eval_entry", H.ROOT / "eval.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    return entry


def test_eval_tasks_without_lm_eval_is_one_line_error(monkeypatch):
    from neox.eval.training import make_eval_tasks_fn

    for mod in [m for m in sys.modules if m == "lm_eval" or m.startswith(("lm_eval.", "neox.eval.lm"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    args = NeoXArgs.from_flat(H.model_flat(eval_tasks=["arith_mc"]), world_size=1)
    for call in (lambda: _entry().run(args), lambda: make_eval_tasks_fn(args, None, None, None)):
        with pytest.raises(ConfigError) as err:
            call()
        assert _one_line(err).startswith("eval_tasks:") and "lm_eval==" in str(err.value)


def test_in_training_hook_checks_tasks_before_training(tmp_path):
    pytest.importorskip("lm_eval")
    from neox.eval.training import make_eval_tasks_fn

    H.offline()
    tasks = H.task_dir(tmp_path)
    args = NeoXArgs.from_flat(H.model_flat(eval_tasks=["arith_mc", "no_such_task"],
                                           eval_tasks_include_path=[tasks]), world_size=1)
    with pytest.raises(ConfigError) as err:
        make_eval_tasks_fn(args, None, None, None)
    assert "no_such_task" in _one_line(err) and "eval_tasks" in str(err.value)
    bad = NeoXArgs.from_flat(H.model_flat(eval_tasks=["arith_mc"], eval_tasks_include_path=[str(tmp_path / "x")]),
                             world_size=1)
    with pytest.raises(ConfigError) as err:
        make_eval_tasks_fn(bad, None, None, None)
    assert _one_line(err).startswith("eval_tasks_include_path:")
    assert make_eval_tasks_fn(NeoXArgs.from_flat(H.model_flat(), world_size=1), None, None, None) is None


def test_checkpoint_to_load_follows_inference_load_dir(tmp_path):
    entry = _entry()
    assert entry.checkpoint_to_load(CheckpointConfig(load="a", save=str(tmp_path))) == "a"
    with pytest.raises(ConfigError) as err:
        entry.checkpoint_to_load(CheckpointConfig(save=str(tmp_path)))  # no latest file yet
    assert _one_line(err).startswith("load:")
    (tmp_path / "latest").write_text("global_step4")
    assert entry.checkpoint_to_load(CheckpointConfig(save=str(tmp_path))) == str(tmp_path)
    assert entry._iteration(str(tmp_path)) == 4


def test_deepy_eval_tasks_override(tmp_path):
    from deepy import parse_cli

    cli = parse_cli(["eval.py", "a.yml", "--eval_tasks", "arith_mc", "arith_gen"])
    assert cli.eval_tasks == ["arith_mc", "arith_gen"]


def test_metric_record_names_task_and_metric():
    from neox.eval.harness import metric_record

    res = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                                 "sample_len": 8},
                       "arith_mc": {"acc,none": 0.5, "acc_stderr,none": "N/A"}}}
    assert metric_record(res) == {"gsm8k/exact_match/strict-match": 0.25, "gsm8k/exact_match_stderr/strict-match": 0.1, "arith_mc/acc": 0.5}
