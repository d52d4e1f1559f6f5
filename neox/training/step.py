"""One training step on a DeepSpeed engine: micro-batches → forward → lm_loss → backward → step.

The plain engine takes ``gradient_accumulation_steps`` micro-batches per step (its ``backward``
scales each loss by 1/GAS, its ``step`` applies the update only at the accumulation boundary). The
pipeline engine runs its own schedule over the same number of micro-batches in ``train_batch``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from neox.training.engine import Engine
from neox.training.grad_clip import clip_grad_norm_, release_grad_scale, uses_own_clipping
from neox.training.norms import GradNorms
from neox.training.readback import PendingScalars


@dataclass
class StepResult:
    """What one optimizer step reports to the loop."""

    loss: float
    """Mean lm loss of the step's micro-batches, averaged over data-parallel ranks."""
    applied: bool
    """False when the fp16 loss scaler skipped the update (overflow)."""
    grad_norm: float | None = None
    timers_ms: dict[str, float] = field(default_factory=dict)


def get_batch(data: dict[str, torch.Tensor], eod: int | None, eod_mask_loss: bool,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [b, s], labels [b, s], loss_mask [b, s] from a ``{"text": [b, s + 1]}`` batch.

    As in NeoX/Megatron, ``eod_mask_loss`` zeroes the loss where the *input* token is EOD, i.e. the
    prediction of the first token of the next document.
    """
    text = data["text"].to(device=device, dtype=torch.long, non_blocking=True)
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    loss_mask = torch.ones(tokens.shape, dtype=torch.float32, device=device)
    if eod_mask_loss and eod is not None:
        loss_mask[tokens == eod] = 0.0
    return tokens, labels, loss_mask


def pipe_batches(data_iter: Iterator[dict[str, torch.Tensor]], eod: int | None,
                 eod_mask_loss: bool) -> Iterator[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """The ``((input_ids, position_ids), (labels, loss_mask))`` tuples GPTModelPipe consumes.

    Tensors stay on the CPU: the pipeline engine moves them to its device as it loads them.
    """
    for data in data_iter:
        tokens, labels, loss_mask = get_batch(data, eod, eod_mask_loss, torch.device("cpu"))
        position_ids = torch.arange(tokens.shape[1], dtype=torch.long).unsqueeze(0).expand_as(tokens)
        yield (tokens, position_ids.contiguous()), (labels, loss_mask)


def dp_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a scalar over the data-parallel group (a no-op on one rank)."""
    size = parallel_state.get_data_parallel_world_size()
    if size == 1 or not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value / size


class _Timer:
    """Wall-clock sections of a step; synchronises the GPU only when a breakdown is asked for."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled, self.device, self.ms = enabled, device, {}

    def mark(self, name: str, start: float) -> float:
        if not self.enabled:
            return start
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (now - start) * 1000
        return now


@dataclass
class LaunchedStep:
    """A step whose GPU work may still be running; ``result()`` reads its scalars back."""

    scalars: PendingScalars
    applied: bool
    timers_ms: dict[str, float] = field(default_factory=dict)

    def result(self) -> StepResult:
        values = self.scalars.get()
        return StepResult(values["loss"], self.applied, values.get("grad_norm"), self.timers_ms)


def _grad_norm(engine: Engine) -> torch.Tensor | float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else norm if torch.is_tensor(norm) else float(norm)


def _own_clipping(engine: Engine) -> bool:
    return uses_own_clipping(int(engine.zero_optimization_stage()), engine.fp16_enabled(), engine.bfloat16_enabled())


def train_step(engine: Engine, data_iter: Iterator, *, eod: int | None, eod_mask_loss: bool,
               device: torch.device, loss_fn: Any, grad_clip: float = 0.0, breakdown: bool = False,
               grad_norms: GradNorms | None = None) -> LaunchedStep:
    """One optimizer step on a plain (non-pipeline) engine, returned without waiting for the GPU.

    ``grad_clip`` is applied here on engines whose clipping neox does itself (``grad_clip``
    module); elsewhere DeepSpeed clips with the config's ``gradient_clipping``.
    """
    timer = _Timer(breakdown, device)
    engine.train()
    losses = []
    own_norm = None
    accumulate = getattr(engine.optimizer, "accumulate", None)
    for _ in range(engine.gradient_accumulation_steps()):
        t = time.perf_counter()
        tokens, labels, loss_mask = get_batch(next(data_iter), eod, eod_mask_loss, device)
        t = timer.mark("batch", t)
        loss = loss_fn(engine(tokens), labels, loss_mask)
        t = timer.mark("forward", t)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        if accumulate is not None:
            accumulate(boundary)  # fp32 gradient sums (MasterWeightAdamW); all-reduced at the boundary
        t = timer.mark("backward", t)
        if grad_norms is not None and boundary:
            grad_norms.capture(engine.module, engine.optimizer)  # log_grad_norm: before clipping and the step
        boundary_clip = boundary and _own_clipping(engine)
        if boundary_clip:
            own_norm = clip_grad_norm_(engine.module.parameters(), grad_clip, engine.optimizer)
        engine.step()
        if boundary_clip:
            release_grad_scale(engine.optimizer)
        timer.mark("optimizer", t)
        losses.append(loss.detach().float())
    mean = dp_mean(torch.stack(losses).mean())
    norm = _grad_norm(engine)
    return LaunchedStep(PendingScalars(loss=mean, grad_norm=norm if norm is not None else own_norm),
                        bool(engine.was_step_applied()), timer.ms)


def train_step_pipe(engine: Engine, data_iter: Iterator, *, device: torch.device,
                    breakdown: bool = False) -> LaunchedStep:
    """One optimizer step on a DeepSpeed PipelineEngine (its schedule pulls GAS micro-batches)."""
    timer = _Timer(breakdown, device)
    t = time.perf_counter()
    loss = engine.train_batch(data_iter)
    timer.mark("train_batch", t)
    return LaunchedStep(PendingScalars(loss=loss, grad_norm=_grad_norm(engine)), bool(engine.was_step_applied()), timer.ms)
