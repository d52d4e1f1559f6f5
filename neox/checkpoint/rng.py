"""RNG states of one rank: Python, NumPy, torch CPU, CUDA, and the tensor-parallel tracker.

Each rank writes its own ``rng_state_rank{R}.pt`` because DeepSpeed saves ``client_state`` only
from the ranks that write model files (data-parallel rank 0), so per-rank state cannot ride in it.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from neox.checkpoint.manifest import fsync_path


def rng_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"rng_state_rank{rank}.pt")


def _tracker():
    """megatron_core's model-parallel CUDA RNG tracker, when that module exists."""
    try:
        from megatron_core.tensor_parallel import random as tp_random
    except ImportError:
        return None
    getter = getattr(tp_random, "get_rng_tracker", None) or getattr(tp_random, "get_cuda_rng_tracker", None)
    return getter() if getter is not None else None


def get_rng_state() -> dict[str, Any]:
    """Every RNG state this process uses."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _tracker()
    if tracker is not None and hasattr(tracker, "get_states"):
        state["tp_tracker"] = tracker.get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (entries absent here are left alone)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[0])
    tracker = _tracker()
    if state.get("tp_tracker") and tracker is not None and hasattr(tracker, "set_states"):
        tracker.set_states(state["tp_tracker"])


def save_rng_state(tag_dir: str, rank: int) -> str:
    """Write this rank's RNG state file (fsynced); return its path."""
    path = rng_file(tag_dir, rank)
    tmp = path + ".tmp"
    torch.save(get_rng_state(), tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    return path


def load_rng_state(tag_dir: str, rank: int) -> bool:
    """Restore this rank's RNG state from ``tag_dir``; False when the checkpoint has no file for it."""
    path = rng_file(tag_dir, rank)
    if not os.path.isfile(path):
        return False
    # weights_only: unpickling runs no code; NumPy's state array is the only non-tensor object allowed
    with torch.serialization.safe_globals(_numpy_state_globals()):
        set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
    return True


def _numpy_state_globals() -> list[Any]:
    """What unpickling ``np.random.get_state()`` needs (an ndarray of uint32)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
