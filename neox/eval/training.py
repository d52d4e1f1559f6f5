"""``eval_tasks`` during training: run the harness at eval_interval and at the end, log like validation loss.

The training run is left exactly as it was: the model's train/eval mode and every RNG stream (Python,
NumPy, torch, CUDA, the tensor-parallel tracker) are restored afterwards, so losses, determinism and
resume do not depend on whether tasks ran (the harness seeds the global RNGs itself). The
compiled training blocks run eagerly meanwhile (``without_compile``), so training keeps its graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_core import parallel_state
from neox.model.decode_graph import is_compiled


@contextlib.contextmanager
def preserved_training_state(module: torch.nn.Module) -> Iterator[None]:
    from neox.checkpoint.rng import get_rng_state, set_rng_state

    rng, was_training = get_rng_state(), module.training
    try:
        yield
    finally:
        module.train(was_training)
        set_rng_state(rng)


@contextlib.contextmanager
def without_compile(module: torch.nn.Module) -> Iterator[None]:
    """``module``'s submodules run their own eager forward meanwhile (``Module.compile()`` undone, then redone).

    The harness's batches change shape from one to the next. A compiled training block that saw them
    would recompile, and Dynamo, which tries its newest graph first, would from then on run training's
    own shape through that dynamic-shape graph: a recompile of the backward too, and another kernel set,
    after every run's first evaluation. Eager, evaluation compiles nothing and its decode steps can be
    CUDA graphs (neox/model/decode_graph.py refuses compiled modules).
    """
    saved = [(m, m._compiled_call_impl) for m in module.modules() if is_compiled(m)]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in saved:
            m._compiled_call_impl = impl


def plain_model(module: torch.nn.Module) -> torch.nn.Module:
    """The engine's module as a GPTModel: a pipeline module is copied into one, its other stages' parameters
    broadcast over the pipeline group first (collective), so every stage holds this tensor-parallel rank's
    whole model for the evaluation."""
    from neox.model import GPTModel
    from neox.model.pipe import GPTModelPipe

    if not isinstance(module, GPTModelPipe):
        return module
    params = {name: p.detach() for name, p in module.plain_named_parameters()}
    first = next(iter(params.values()))
    if parallel_state.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        params = _gather_stages(params, parallel_state.get_pipeline_model_parallel_group())
    model = GPTModel(module.cfg, device=first.device, dtype=first.dtype)
    model.load_state_dict(params)
    return model


def _gather_stages(params: dict[str, torch.Tensor], group: Any) -> dict[str, torch.Tensor]:
    """Every stage's parameters (GPTModel names) on every rank of the pipeline ``group``: each name is
    broadcast from the first stage that holds it (a tied embedding lives on two stages; one copy is taken)."""
    import torch.distributed as dist

    device = next(iter(params.values())).device
    held: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(held, {name: (tuple(t.shape), t.dtype) for name, t in params.items()}, group=group)
    out: dict[str, torch.Tensor] = {}
    for owner, names in enumerate(held):
        src = dist.get_global_rank(group, owner)
        for name, (shape, dtype) in names.items():
            if name in out:
                continue
            mine = params.get(name) if src == dist.get_rank() else None
            t = mine if mine is not None else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(t, src=src, group=group)
            out[name] = t
    return out


def make_eval_tasks_fn(args: Any, engine: Any, tokenizer: Any, logger: Any) -> Callable[[int], None] | None:
    """A collective ``fn(iteration)`` running ``eval_tasks`` (None when there are none); checks the setup now."""
    ecfg = args.eval
    if not ecfg.eval_tasks:
        return None
    from neox.eval import harness

    manager = harness.task_manager(ecfg.eval_tasks_include_path)
    harness.check_tasks(manager, ecfg.eval_tasks)

    def run(iteration: int) -> None:
        from neox.eval.lm import NeoXLM

        module = engine.module
        with preserved_training_state(module), without_compile(module), torch.no_grad():
            model = plain_model(module).eval()
            lm = NeoXLM(model, tokenizer, batch_size=ecfg.eval_batch_size, seed=args.training.seed)
            results = harness.evaluate_tasks(lm, ecfg, manager, seed=args.training.seed)
        if results is not None and logger.enabled:
            harness.report(results, ecfg, args.logging.log_dir, logger, iteration)

    return run
