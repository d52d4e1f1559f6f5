"""Running lm-evaluation-harness tasks on a ``NeoXLM``: task lookup, the evaluator call, result files, records.

The harness owns tasks, prompts, metrics and the table; neox hands it the model and the EvalConfig
settings (few-shot, limit, batch size, bootstrap resamples) and writes what it returns.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neox.errors import ConfigError

if TYPE_CHECKING:
    from neox.config.run import EvalConfig


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("eval_tasks: lm-evaluation-harness is not installed; pip install 'neox[eval]' "
                          "(or lm_eval==0.4.13)") from None


def task_manager(include_paths: list[str]) -> Any:
    """The harness's TaskManager over its stock tasks plus the folders of ``eval_tasks_include_path``."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not os.path.isdir(path):
            raise ConfigError(f"eval_tasks_include_path: {path} is not a folder of task YAMLs")
    return TaskManager(include_path=list(include_paths) or None)


def check_tasks(manager: Any, tasks: list[str]) -> list[str]:
    """The task names, or a one-line ConfigError naming the unknown ones."""
    if not tasks:
        raise ConfigError("eval_tasks: no tasks given (e.g. --eval_tasks lambada_openai hellaswag)")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(f"eval_tasks: unknown task(s) {unknown}; list them with `lm_eval ls tasks`, or add a folder "
                          "of task YAMLs with eval_tasks_include_path")
    return list(tasks)


def evaluate_tasks(lm: Any, ecfg: EvalConfig, manager: Any, *, seed: int = 1234) -> dict[str, Any] | None:
    """The harness's results dict (on data-parallel rank 0; None elsewhere)."""
    from lm_eval.evaluator import simple_evaluate

    limit = ecfg.eval_limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    return simple_evaluate(
        model=lm, tasks=check_tasks(manager, ecfg.eval_tasks), num_fewshot=ecfg.eval_num_fewshot,
        batch_size=ecfg.eval_batch_size, limit=limit, bootstrap_iters=ecfg.eval_bootstrap_iters,
        log_samples=ecfg.eval_log_samples, task_manager=manager, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )


def results_path(ecfg: EvalConfig, log_dir: str | None, stamp: str) -> Path:
    """{eval_results_prefix}_eval_results_<time>.json, or <log_dir or .>/eval_results_<time>.json."""
    if ecfg.eval_results_prefix:
        return Path(f"{ecfg.eval_results_prefix}_eval_results_{stamp}.json")
    return Path(log_dir or ".") / f"eval_results_{stamp}.json"


def write_results(results: dict[str, Any], ecfg: EvalConfig, log_dir: str | None) -> Path:
    """The results JSON (samples left out) and, with eval_log_samples, samples_<task>_<time>.jsonl beside it."""
    from lm_eval.utils import handle_non_serializable

    stamp = datetime.now().isoformat().replace(":", "-")  # the harness's own stamp: microseconds, no clashes
    path = results_path(ecfg, log_dir, stamp)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in results.items() if k != "samples"}
    path.write_text(json.dumps(body, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    for task, samples in (results.get("samples") or {}).items():
        with open(path.parent / f"samples_{task}_{stamp}.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path


def report(results: dict[str, Any], ecfg: EvalConfig, log_dir: str | None, logger: Any, iteration: int) -> Path:
    """What rank 0 does with the results: the files (``write_results``), the harness's table on stdout and one
    ``eval_tasks`` record through ``logger`` (a MetricsLogger) at ``iteration``; the results JSON's path."""
    path = write_results(results, ecfg, log_dir)
    print(table(results), flush=True)
    logger.log_eval_metrics("eval_tasks", iteration, metric_record(results))
    return path


def table(results: dict[str, Any]) -> str:
    """The harness's own results table (and the groups table when there are groups)."""
    from lm_eval.utils import make_table

    out = make_table(results)
    if results.get("groups"):
        out += "\n" + make_table(results, "groups")
    return out


def metric_record(results: dict[str, Any]) -> dict[str, float]:
    """{"<task>/<metric>": value} of every numeric metric and stderr (``/<filter>`` added unless the filter is
    'none'); the document count is left out."""
    rec: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, flt = key.partition(",")
            rec[f"{task}/{metric}" + (f"/{flt}" if flt and flt != "none" else "")] = float(value)
    return rec
