"""Flat NeoX keys: which section owns each one, aliases, and did-you-mean suggestions.

Every dataclass field is its own flat key (names are unique across sections). Aliases live only here:
dashed spellings (``vocab-file``) and legacy NeoX/Megatron names (``save_interval``, ``clip_grad``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType

from neox.config import compat
from neox.config.data import DataConfig, TokenizerConfig
from neox.config.model import ModelConfig
from neox.config.optim import LRConfig, OptimizerConfig, PrecisionConfig
from neox.config.parallel import ParallelConfig
from neox.config.run import (
    CheckpointConfig,
    EvalConfig,
    LauncherConfig,
    LoggingConfig,
    TextGenConfig,
    TrainingConfig,
)

# NeoXArgs attribute -> section class, in the order docs/config.md lists them.
SECTIONS: Mapping[str, type] = MappingProxyType(
    {
        "model": ModelConfig,
        "parallel": ParallelConfig,
        "optim": OptimizerConfig,
        "lr": LRConfig,
        "precision": PrecisionConfig,
        "data": DataConfig,
        "tokenizer": TokenizerConfig,
        "training": TrainingConfig,
        "checkpoint": CheckpointConfig,
        "logging": LoggingConfig,
        "textgen": TextGenConfig,
        "launcher": LauncherConfig,
        "eval": EvalConfig,
    }
)

# legacy / alternative name -> canonical field (after dashes became underscores)
ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "save_interval": "checkpoint_factor",
        "clip_grad": "gradient_clipping",
        "batch_size": "train_micro_batch_size_per_gpu",
        "micro_batch_size": "train_micro_batch_size_per_gpu",
        "gas": "gradient_accumulation_steps",
        "global_batch_size": "train_batch_size",
        "num_key_value_heads": "num_kv_heads",
        "ffn_hidden_size": "intermediate_size",
        "rope_theta": "rotary_emb_base",
        "warmup_steps": "warmup_iters",
        "tensor_model_parallel_size": "model_parallel_size",
        "pipeline_model_parallel_size": "pipe_parallel_size",
    }
)


@lru_cache(maxsize=1)
def field_sections() -> Mapping[str, str]:
    """Flat key -> NeoXArgs attribute of the section that owns it."""
    index: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in index:  # a design invariant, not a user error
                raise RuntimeError(f"field {f.name} is in both {index[f.name]} and {section}")
            index[f.name] = section
    return MappingProxyType(index)


def compat_keys() -> frozenset[str]:
    """NeoX keys accepted without a dataclass field (see neox.config.compat)."""
    return frozenset(compat.NO_EFFECT) | frozenset(compat.UNSUPPORTED) | frozenset(compat.DEEPSPEED_PASSTHROUGH)


def known_keys() -> frozenset[str]:
    return frozenset(field_sections()) | compat_keys()


def canonical(key: str) -> str:
    """The flat key a user spelling stands for: dashes -> underscores, then aliases."""
    name = str(key).strip().replace("-", "_")
    return ALIASES.get(name, name)


def suggest(key: str) -> str | None:
    """The known key closest to ``key`` (did-you-mean), or None."""
    name = str(key).replace("-", "_")
    candidates = sorted(known_keys() | frozenset(ALIASES))
    # A missing or extra trailing letter ("num_layer") is the commonest typo: prefer prefix matches.
    prefixed = [c for c in candidates if (c.startswith(name) or name.startswith(c)) and abs(len(c) - len(name)) <= 2]
    if prefixed:
        return canonical(min(prefixed, key=lambda c: abs(len(c) - len(name))))
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    return canonical(close[0]) if close else None


def unknown_key_message(key: str) -> str:
    hint = suggest(key)
    return "unknown key" + (f" (did you mean '{hint}'?)" if hint else "")
