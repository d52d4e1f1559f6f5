"""``eval_tasks`` during training: run the harness at eval_interval and at the end, log like validation loss.

The training run is left exactly as it was: the model's train/eval mode and every RNG stream (Python,
NumPy, torch, CUDA, the tensor-parallel tracker) are restored afterwards, so losses, determinism and
resume do not depend on whether tasks ran (the harness seeds the global RNGs itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from neox.errors import ConfigError


@contextlib.contextmanager
def preserved_training_state(module: torch.nn.Module) -> Iterator[None]:
    from neox.checkpoint.rng import get_rng_state, set_rng_state

    rng, was_training = get_rng_state(), module.training
    try:
        yield
    finally:
        module.train(was_training)
        set_rng_state(rng)


def plain_model(module: torch.nn.Module) -> torch.nn.Module:
    """The engine's module as a GPTModel (a one-stage pipeline module is copied into one)."""
    from neox.model import GPTModel
    from neox.model.pipe import GPTModelPipe

    if not isinstance(module, GPTModelPipe):
        return module
    params = dict(module.plain_named_parameters())
    first = next(iter(params.values()))
    model = GPTModel(module.cfg, device=first.device, dtype=first.dtype)
    model.load_state_dict(params)
    return model


def make_eval_tasks_fn(args: Any, engine: Any, tokenizer: Any, logger: Any) -> Callable[[int], None] | None:
    """A collective ``fn(iteration)`` running ``eval_tasks`` (None when there are none); checks the setup now."""
    ecfg = args.eval
    if not ecfg.eval_tasks:
        return None
    if args.parallel.pipe_parallel_size > 1:
        raise ConfigError("eval_tasks: in-training evaluation does not run across pipeline stages; set "
                          "pipe_parallel_size 0 or 1, or evaluate a checkpoint with eval.py")
    from neox.eval import harness

    manager = harness.task_manager(ecfg.eval_tasks_include_path)
    harness.check_tasks(manager, ecfg.eval_tasks)

    def run(iteration: int) -> None:
        from neox.eval.lm import NeoXLM

        module = engine.module
        with preserved_training_state(module), torch.no_grad():
            model = plain_model(module).eval()
            lm = NeoXLM(model, tokenizer, batch_size=ecfg.eval_batch_size, seed=args.training.seed)
            results = harness.evaluate_tasks(lm, ecfg, manager, seed=args.training.seed)
        if results is not None and logger.enabled:
            harness.write_results(results, ecfg, args.logging.log_dir)
            print(harness.table(results), flush=True)
            logger.log_eval_metrics("eval_tasks", iteration, harness.metric_record(results))

    return run
