#!/usr/bin/env python
"""Evaluate a checkpoint with lm-evaluation-harness: ``python deepy.py eval.py CONF... --eval_tasks T1 T2``.

Weights come from ``load`` (else the latest checkpoint under ``save``) in any saved TP/PP layout and
are resharded to this run's ``model_parallel_size``; data-parallel ranks split the requests. Keys:
``eval_tasks``, ``eval_tasks_include_path``, ``eval_num_fewshot``, ``eval_limit``, ``eval_batch_size``,
``eval_bootstrap_iters``, ``eval_log_samples``, ``eval_results_prefix`` (docs/evaluation.md).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from neox.errors import ConfigError, exit_code_of


def checkpoint_to_load(ckpt: Any) -> str:
    """``load``, else the latest checkpoint under ``save`` (neox.config.run.inference_load_dir's rule)."""
    from neox.config.run import inference_load_dir

    where = inference_load_dir(ckpt)
    if where is None:
        raise ConfigError("load: eval.py needs a checkpoint: set load, or save to a folder holding one (a latest file)")
    return where


def run(args: Any) -> dict[str, Any] | None:
    """Build the model at this run's TP size, load the checkpoint, run ``eval_tasks``; rank 0 writes and logs."""
    from neox.eval import harness
    from neox.inference import load_model
    from neox.metrics import MetricsLogger

    if args.parallel.pipe_parallel_size > 1:
        raise ConfigError("pipe_parallel_size: eval.py runs the plain model; set 0 or 1 "
                          "(pipeline checkpoints load at any pipeline size)")
    manager = harness.task_manager(args.eval.eval_tasks_include_path)  # first: a missing lm_eval is one line
    harness.check_tasks(manager, args.eval.eval_tasks)
    load = checkpoint_to_load(args.checkpoint)
    from neox.eval.lm import NeoXLM

    model, tokenizer, args = load_model(args, load)
    lm = NeoXLM(model, tokenizer, batch_size=args.eval.eval_batch_size, seed=args.training.seed)
    results = harness.evaluate_tasks(lm, args.eval, manager, seed=args.training.seed)
    if results is None or int(os.environ.get("RANK", "0")) != 0:
        return results
    logger = MetricsLogger(args.logging, run_config=args.to_flat() if args.logging.use_wandb else None)
    try:
        path = harness.report(results, args.eval, args.logging.log_dir, logger, _iteration(load))
    finally:
        logger.close()
    print(f"neox: eval results -> {path}", file=sys.stderr, flush=True)
    return results


def _iteration(load: str) -> int:
    """The step of the checkpoint evaluated (global_stepN in its latest file), 0 if unknown."""
    from neox.checkpoint.local import TAG_RE, read_latest

    match = TAG_RE.match(read_latest(load) or "")
    return int(match.group(1)) if match else 0


def main() -> None:
    from neox.handoff import rank_args

    run(rank_args())  # process groups are released at exit (pretrain.shutdown via atexit)


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
