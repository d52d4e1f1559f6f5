"""The training loop: steps, logging, evaluation, checkpoints, NaN guard and stop requests."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from neox.checkpoint.state import TrainState
from neox.config import NeoXArgs
from neox.errors import NeoXError
from neox.metrics import MetricsLogger, max_memory_gib
from neox.training import flops
from neox.training.engine import Engine
from neox.training.eval import evaluate
from neox.training.fast_path import FirstStepTimer
from neox.training.norms import GradNorms, norm_fields
from neox.training.preemption import StopRequests
from neox.training.profiler import IterationProfiler
from neox.training.step import LaunchedStep, StepResult, pipe_batches, train_step, train_step_pipe


class TrainingDivergedError(NeoXError):
    """The loss stayed NaN/Inf for max_nan_iterations iterations in a row."""


@dataclass
class TrainContext:
    """Everything the loop needs besides the run state (built once by ``pretrain``)."""

    args: NeoXArgs
    engine: Engine
    device: torch.device
    loss_fn: Callable
    eod: int | None
    logger: MetricsLogger
    stop: StopRequests
    save_fn: Callable[[TrainState, int], None] | None = None
    peak_tflops: float | None = None
    eval_tasks_fn: Callable[[int], None] | None = None
    """Runs the lm-eval ``eval_tasks`` at an iteration (neox.eval.training); None without tasks."""
    weights_suspect: bool = False
    """A step with a non-finite loss was applied (no fp16 loss scaler skipped it): don't save."""
    grad_norms: GradNorms | None = None
    """log_grad_norm: the per-parameter gradient norms of the latest step (set by ``train``)."""

    @property
    def is_pipe(self) -> bool:
        return self.engine.is_pipeline

    @property
    def global_batch(self) -> int:
        return int(self.engine.train_batch_size())


@dataclass
class _Window:
    """Sums over the iterations since the last log line."""

    iters: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    timers_ms: dict[str, float] = field(default_factory=dict)

    def add(self, res: StepResult) -> None:
        self.iters += 1
        # As NeoX: the logged loss is the mean over the interval of the finite losses.
        if math.isfinite(res.loss):
            self.loss_sum += res.loss
            self.loss_count += 1
        for k, v in res.timers_ms.items():
            self.timers_ms[k] = self.timers_ms.get(k, 0.0) + v


def should_save(args: NeoXArgs, iteration: int) -> bool:
    """NeoX's save schedule: every checkpoint_factor iterations (or at its powers), plus extra_save_iters."""
    ck = args.checkpoint
    if not ck.save:
        return False
    if iteration in ck.extra_save_iters:
        return True
    factor = ck.checkpoint_factor
    if not factor:
        return False
    if ck.checkpoint_scale == "log":
        power = factor
        while power < iteration:
            power *= factor
        return power == iteration
    return iteration % factor == 0


def _record(ctx: TrainContext, state: TrainState, res: StepResult, win: _Window) -> dict[str, Any]:
    args = ctx.args
    seq = args.model.seq_length
    per_iter = win.seconds / max(win.iters, 1)
    tokens = ctx.global_batch * seq * win.iters
    tp = flops.throughput(args.model, tokens, win.seconds, args.parallel.world_size or 1, ctx.peak_tflops)
    rec = {
        "iteration": state.iteration, "lm_loss": win.loss_sum / win.loss_count if win.loss_count else res.loss, "lr": float(ctx.engine.get_lr()[0]),
        "grad_norm": res.grad_norm, "loss_scale": ctx.engine.loss_scale(),
        "samples_per_sec": ctx.global_batch * win.iters / max(win.seconds, 1e-9),
        "tokens_per_sec": tokens / max(win.seconds, 1e-9),
        "tflops_per_gpu": tp["tflops_per_gpu"], "hardware_tflops_per_gpu": tp["hardware_tflops_per_gpu"],
        "mfu": tp["mfu"], "consumed_samples": state.consumed_train_samples,
        "consumed_tokens": state.consumed_tokens, "skipped_iterations": state.skipped_iters,
        "nan_iterations": state.nan_iters, "max_memory_gib": max_memory_gib(ctx.device.type),
        "elapsed_ms_per_iteration": per_iter * 1000,
    }
    if win.timers_ms:
        rec["timers_ms"] = {k: v / max(win.iters, 1) for k, v in win.timers_ms.items()}
    rec.update(norm_fields(ctx.engine, args.logging.log_param_norm, ctx.grad_norms))
    return rec


def _step(ctx: TrainContext, train_iter: Iterator) -> LaunchedStep:
    breakdown = ctx.args.logging.wall_clock_breakdown
    if ctx.is_pipe:
        return train_step_pipe(ctx.engine, train_iter, device=ctx.device, breakdown=breakdown)
    return train_step(ctx.engine, train_iter, eod=ctx.eod, eod_mask_loss=ctx.args.data.eod_mask_loss,
                      device=ctx.device, loss_fn=ctx.loss_fn, grad_clip=ctx.args.optim.gradient_clipping,
                      breakdown=breakdown, grad_norms=ctx.grad_norms)


def _account(ctx: TrainContext, state: TrainState, res: StepResult, nan_run: int) -> int:
    """Advance the state by one step; returns the new count of consecutive NaN iterations."""
    state.iteration += 1
    state.consumed_train_samples += ctx.global_batch
    state.consumed_tokens += ctx.global_batch * ctx.args.model.seq_length
    if not res.applied:
        state.skipped_iters += 1
    if math.isfinite(res.loss):
        ctx.weights_suspect = False
        return 0
    if res.applied and not ctx.engine.fp16_enabled():
        ctx.weights_suspect = True  # non-finite gradients went into the weights
    state.nan_iters += 1
    nan_run += 1
    limit = ctx.args.training.max_nan_iterations
    # fp16 recovers through the loss scaler (the step is skipped); bf16/fp32 have no such guard.
    if not ctx.engine.fp16_enabled() and limit and nan_run >= limit:
        raise TrainingDivergedError(
            f"loss was NaN/Inf for {nan_run} iterations in a row (max_nan_iterations={limit}) at "
            f"iteration {state.iteration}; lower lr or check the data")
    return nan_run


def run_eval(ctx: TrainContext, state: TrainState, data_iter: Iterator | None, split: str) -> float | None:
    """Evaluate on one split and log it; returns the loss (None without data)."""
    if data_iter is None or ctx.args.training.eval_iters <= 0:
        return None
    if ctx.is_pipe:
        data_iter = pipe_batches(data_iter, ctx.eod, ctx.args.data.eod_mask_loss)
    loss = evaluate(ctx.engine, data_iter, ctx.args.training.eval_iters, eod=ctx.eod,
                    eod_mask_loss=ctx.args.data.eod_mask_loss, device=ctx.device, loss_fn=ctx.loss_fn)
    if split == "validation":
        state.consumed_valid_samples += ctx.global_batch * ctx.args.training.eval_iters
    ctx.logger.log_eval(split, state.iteration, loss)
    return loss


def _save(ctx: TrainContext, state: TrainState) -> None:
    if ctx.save_fn is not None and ctx.args.checkpoint.save:
        if ctx.weights_suspect:  # never replace the last good checkpoint with non-finite weights
            logging.getLogger(__name__).warning(
                "not saving iteration %d: a non-finite loss was applied to the weights; latest stays at the "
                "last checkpoint with finite losses", state.iteration)
            return
        ctx.save_fn(state, state.iteration)


def _settle(ctx: TrainContext, state: TrainState, step: LaunchedStep, win: _Window, nan_run: int) -> tuple[StepResult, int]:
    """Read a launched step's scalars back and account for it."""
    res = step.result()
    win.add(res)
    return res, _account(ctx, state, res, nan_run)


def train(ctx: TrainContext, state: TrainState, train_iter: Iterator, valid_iter: Iterator | None = None,
          test_iter: Iterator | None = None) -> str | None:
    """Train until ``train_iters``; returns the stop reason if stopped early (after saving).

    The host reads a step's loss back only after it has queued the next step, so the GPU never
    waits for Python between steps. Before anything that needs the current step's outcome (a log
    line, a save, an evaluation, a stop, the end) the loop settles it first.
    """
    args = ctx.args
    tcfg, log_interval = args.training, max(args.logging.log_interval, 1)
    # One pipe-batch generator for the whole run: a fresh one per step would drop its buffered batch.
    source = pipe_batches(train_iter, ctx.eod, args.data.eod_mask_loss) if ctx.is_pipe else train_iter
    win, nan_run, last_saved = _Window(), 0, None
    lg = args.logging
    if lg.log_grad_norm:
        ctx.grad_norms = GradNorms(ctx.engine.loss_scale)
        if ctx.is_pipe:  # train_batch runs backward and the step in one call: capture inside it
            grads, engine = ctx.grad_norms, ctx.engine
            engine.before_pipeline_step(lambda: grads.capture(engine.module, engine.optimizer))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    profiler = IterationProfiler(lg.profile, lg.profile_step_start, lg.profile_step_stop, lg.log_dir, rank)
    launched, pending = state.iteration, None
    window_start, paused = time.perf_counter(), 0.0
    first_step = FirstStepTimer(ctx.args.model.torch_compile, ctx.device, rank)
    while launched < (tcfg.train_iters or 0):
        profiler.before(launched)
        step = _step(ctx, source)
        profiler.after(launched, ctx.device)
        first_step.done()
        launched += 1
        if pending is not None:
            _, nan_run = _settle(ctx, state, pending, win, nan_run)
        pending = step
        reason = ctx.stop.should_stop(ctx.device)
        if reason is None and tcfg.exit_interval and launched % tcfg.exit_interval == 0:
            reason = f"exit_interval {tcfg.exit_interval}"
        log_now = launched % log_interval == 0
        save_now = should_save(args, launched)
        eval_now = bool(tcfg.eval_interval) and launched % tcfg.eval_interval == 0
        if not (log_now or save_now or eval_now or reason or launched >= (tcfg.train_iters or 0)):
            continue
        res, nan_run = _settle(ctx, state, pending, win, nan_run)
        pending = None
        if log_now:
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)  # so the logged time covers the queued work
            now = time.perf_counter()
            win.seconds = now - window_start - paused
            ctx.logger.log_train(_record(ctx, state, res, win))
            win, window_start, paused = _Window(), now, 0.0
        t = time.perf_counter()
        if save_now:
            _save(ctx, state)
            last_saved = state.iteration
        if eval_now:
            run_eval(ctx, state, valid_iter, "validation")
            if ctx.eval_tasks_fn is not None:
                ctx.eval_tasks_fn(state.iteration)
        paused += time.perf_counter() - t  # saving and evaluation are not training throughput
        if reason is not None:
            if last_saved != state.iteration:
                _save(ctx, state)
            return reason
    if last_saved != state.iteration and state.iteration > 0:
        _save(ctx, state)
    run_eval(ctx, state, test_iter, "test")
    if ctx.eval_tasks_fn is not None and not (tcfg.eval_interval and state.iteration % tcfg.eval_interval == 0):
        ctx.eval_tasks_fn(state.iteration)  # the end of training, unless the last interval just ran them
    return None
