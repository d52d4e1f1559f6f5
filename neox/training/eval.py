"""Evaluation: mean lm loss over ``eval_iters`` iterations of a split (validation or test).

Each eval iteration consumes one global batch (``gradient_accumulation_steps`` micro-batches per
rank), as in NeoX, so the samples drawn match what the data builder sized the splits for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from neox.training.engine import Engine
from neox.training.step import dp_mean, get_batch


@torch.no_grad()
def evaluate(engine: Engine, data_iter: Iterator, eval_iters: int, *, eod: int | None, eod_mask_loss: bool,
             device: torch.device, loss_fn: Any) -> float:
    """Mean loss over ``eval_iters`` global batches, averaged over data-parallel ranks (on the pipeline
    engine, ``data_iter`` yields ``pipe_batches``)."""
    is_pipe = engine.is_pipeline
    losses = []
    for _ in range(eval_iters):
        if is_pipe:
            losses.append(engine.eval_batch(data_iter).detach().float().reshape(()))
            continue
        engine.eval()
        for _ in range(engine.gradient_accumulation_steps()):
            tokens, labels, loss_mask = get_batch(next(data_iter), eod, eod_mask_loss, device)
            losses.append(loss_fn(engine(tokens), labels, loss_mask).detach().float())
    engine.train()
    mean = torch.stack(losses).mean()
    # The pipeline engine already averages over data-parallel ranks.
    return float(mean if is_pipe else dp_mean(mean))


def fixed_batch_loss_fn(engine: Engine, *, vocab_size: int, micro_batch: int, seq_length: int, seed: int,
                        device: torch.device, loss_fn: Any) -> Callable[[], float]:
    """A collective returning the loss of one seeded random batch: the checkpoint's forward-pass check.

    The same weights give the same loss before saving and after loading, at any data-parallel size.
    """
    import itertools

    gen = torch.Generator().manual_seed(seed)
    batch = {"text": torch.randint(0, vocab_size, (micro_batch, seq_length + 1), generator=gen)}

    def run() -> float:
        if engine.is_pipeline:
            from neox.training.step import pipe_batches

            return float(engine.eval_batch(pipe_batches(itertools.repeat(batch), None, False)).float())
        engine.eval()
        with torch.no_grad():
            tokens, labels, mask = get_batch(batch, None, False, device)
            loss = loss_fn(engine(tokens), labels, mask).float()
        engine.train()
        return float(dp_mean(loss))

    return run
