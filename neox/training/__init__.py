"""neox.training: pretrain(args) and the pieces it wires (state, schedule, optimizer, loop)."""

from __future__ import annotations

from typing import Any

from neox.checkpoint.state import TrainState

__all__ = ["pretrain", "TrainState"]


def pretrain(args: Any) -> Any:
    """Train the model ``args`` (a NeoXArgs) describes; see ``neox.training.pretrain.pretrain``."""
    from neox.training.pretrain import pretrain as _pretrain

    return _pretrain(args)
