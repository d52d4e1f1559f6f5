"""Learning-rate schedules as GPT-NeoX's AnnealingLR computes them.

Warmup is linear from 0 to ``lr`` over ``warmup_iter`` steps, then the decay style runs over the
remaining ``decay_iters - warmup_iter`` steps, never going below ``min_lr``:

- constant: ``lr``
- linear:   ``lr * (D - n) / D``
- cosine:   ``min_lr + (lr - min_lr) / 2 * (1 + cos(pi * n / D))``
- exponential: ``lr * exp(-0.693 * n / D)`` (halves over the decay)

with ``n = iteration - warmup_iter`` and ``D = decay_iters - warmup_iter``. The scheduler is handed
to ``deepspeed.initialize``; the engine calls ``step()`` after every applied optimizer step, so a
step the fp16 loss scaler skips does not advance the schedule (as in NeoX).
"""

from __future__ import annotations

import math
from typing import Any

from neox.config import LRConfig
from neox.config.derive import lr_schedule
from neox.errors import CheckpointError, ConfigError


def resolve_schedule(cfg: LRConfig, train_iters: int, base_lr: float) -> dict[str, Any]:
    """The schedule's numbers (peak lr, min lr, warmup and decay lengths, style) by the config's one rule,
    ``neox.config.derive.lr_schedule``; a derived config already holds them."""
    s = lr_schedule(cfg, train_iters, base_lr)
    if s.decay_iters is None:
        raise ConfigError("train_iters: expected a positive integer to train (the schedule decays over it)")
    return {"lr": base_lr, "min_lr": s.min_lr, "warmup_iters": s.warmup_iters, "decay_iters": s.decay_iters,
            "style": s.style}


def lr_at(iteration: float, *, lr: float, min_lr: float, warmup_iters: float, decay_iters: int,
          style: str) -> float:
    """The learning rate used for the step after ``iteration`` steps have been applied."""
    if warmup_iters > 0 and iteration <= warmup_iters:
        return lr * iteration / warmup_iters
    span = max(decay_iters - warmup_iters, 1e-12)
    n = min(iteration, decay_iters) - warmup_iters
    if style == "linear":
        value = lr * (span - n) / span
    elif style == "cosine":
        value = min_lr + (lr - min_lr) / 2.0 * (math.cos(math.pi * n / span) + 1.0)
    elif style == "exponential":
        value = lr * math.exp(-0.693 * n / span)
    elif style == "constant":
        value = lr
    else:
        raise ConfigError(f"lr_decay_style: expected constant, linear, cosine or exponential, got {style!r}")
    return max(value, min_lr)


class AnnealingLR:
    """Sets every param group's lr from ``lr_at``; DeepSpeed calls ``step()`` after each applied step.

    On checkpoint load, as GPT-NeoX's AnnealingLR: ``override`` (override_lr_scheduler) keeps the
    config's schedule, ``use_checkpoint`` (use_checkpoint_lr_scheduler) takes the checkpoint's, and with
    neither the two must agree (a CheckpointError names what differs). The position always comes back.
    """

    def __init__(self, optimizer: Any, schedule: dict[str, Any], last_iter: int = 0, *,
                 override: bool = False, use_checkpoint: bool = False) -> None:
        if override and use_checkpoint:
            raise ConfigError("override_lr_scheduler: both it and use_checkpoint_lr_scheduler are set; set one")
        self.optimizer = optimizer
        self.schedule = dict(schedule)
        self.override, self.use_checkpoint = override, use_checkpoint
        self.num_iters = last_iter
        self.step(last_iter)

    def get_lr(self) -> float:
        return lr_at(self.num_iters, **self.schedule)

    def get_last_lr(self) -> list[float]:
        return [self.get_lr()]

    def step(self, step_num: int | None = None, **_: Any) -> None:
        """Advance one step (or jump to ``step_num``) and write the new lr into the optimizer."""
        self.num_iters = self.num_iters + 1 if step_num is None else step_num
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"num_iters": self.num_iters, **self.schedule}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        saved = {k: sd[k] for k in self.schedule if k in sd}
        if self.use_checkpoint:
            self.schedule.update(saved)
        elif not self.override:
            differ = [k for k, v in saved.items() if not _same(v, self.schedule[k])]
            if differ:
                both = ", ".join(f"{k} {saved[k]!r} (config {self.schedule[k]!r})" for k in differ)
                raise CheckpointError(f"lr_scheduler: the checkpoint's schedule differs from the config's: {both}; set "
                                      "override_lr_scheduler: true to use the config's or use_checkpoint_lr_scheduler: "
                                      "true to use the checkpoint's")
        self.step(int(sd.get("num_iters", 0)))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b
