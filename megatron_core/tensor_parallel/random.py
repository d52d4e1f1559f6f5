"""RNG tracker: a separate random stream for dropout inside tensor-parallel regions.

Activations that are replicated across tensor-parallel ranks (hidden states) must see the same
dropout mask on every rank, so they use the default generator, seeded identically. Activations
that are split across ranks (attention probabilities of each rank's heads) need masks that differ
per rank, so they draw from the "model-parallel" stream, seeded with an offset by tensor rank.
The tracker keeps both the CPU and (when present) the current CUDA generator state per stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_core import parallel_state

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Megatron's offset, so model-parallel seeds never collide with data seeds.
_SEED_OFFSET = 2718


def _get_states() -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_states(states: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


class RNGStatesTracker:
    """Named generator states; ``fork(name)`` runs a block on that stream and saves its progress."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.seeds: set[int] = set()

    def reset(self) -> None:
        self.states, self.seeds = {}, set()

    def get_states(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return dict(self.states)

    def set_states(self, states: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self.states = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds or name in self.states:
            raise ValueError(f"RNG stream {name!r} or seed {seed} already exists")
        saved = _get_states()
        torch.manual_seed(seed)
        self.states[name] = _get_states()
        _set_states(saved)
        self.seeds.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self.states:
            raise KeyError(f"RNG stream {name!r} was never added (call model_parallel_manual_seed)")
        saved = _get_states()
        _set_states(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_states()
            _set_states(saved)


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (kept in parallel_state, the one home of global state)."""
    if parallel_state._STATE.rng_tracker is None:
        parallel_state._STATE.rng_tracker = RNGStatesTracker()
    return parallel_state._STATE.rng_tracker


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default stream with ``seed`` (same on all tensor ranks) and the model-parallel stream
    with ``seed + 2718 + tensor_rank`` (different per tensor rank)."""
    torch.manual_seed(seed)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, seed + _SEED_OFFSET + parallel_state.get_tensor_model_parallel_rank())


@contextlib.contextmanager
def fork_model_parallel_rng() -> Iterator[None]:
    """Run on the model-parallel stream if one was seeded; else on the default stream (one process)."""
    tracker = get_rng_tracker()
    if MODEL_PARALLEL_RNG in tracker.states:
        with tracker.fork(MODEL_PARALLEL_RNG):
            yield
    else:
        yield


def checkpoint_context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for torch.utils.checkpoint: the recomputation replays the tracker streams from
    where the original forward started, so dropout masks drawn in forks match."""
    tracker = get_rng_tracker()
    snapshot = tracker.get_states()

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        current = tracker.get_states()
        tracker.set_states(snapshot)
        try:
            yield
        finally:
            tracker.set_states(current)

    return contextlib.nullcontext(), recompute()
