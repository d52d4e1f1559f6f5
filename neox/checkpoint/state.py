"""TrainState: the run's progress, the only mutable state of the training loop.

The frozen config never changes during a run; everything that advances (iteration, samples and
tokens consumed, skipped and NaN step counts) lives here and is saved with every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainState:
    """Progress of one training run (saved in checkpoints, restored on resume)."""

    iteration: int = 0
    """Optimizer steps completed (applied or skipped)."""

    consumed_train_samples: int = 0
    """Training samples drawn from the data iterators so far, over all data-parallel ranks."""

    consumed_valid_samples: int = 0
    """Validation samples drawn so far, over all data-parallel ranks."""

    consumed_tokens: int = 0
    """Training tokens consumed so far (samples * seq_length)."""

    skipped_iters: int = 0
    """Steps the fp16 loss scaler skipped because of an overflow."""

    nan_iters: int = 0
    """Iterations whose loss was NaN or Inf (in total)."""

    def to_dict(self) -> dict[str, int]:
        """A JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Rebuild from ``to_dict()`` output; missing fields (older checkpoints) take their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in data.items() if k in names})
