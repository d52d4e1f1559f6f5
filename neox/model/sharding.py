"""How each GPTModel parameter is split over tensor-parallel ranks (docs/internals.md table).

Used by the tests, converters and the resharder: ``shard(cfg, name, full, rank, tp)`` cuts a full
tensor into this rank's piece, ``unshard(cfg, name, shards)`` puts the pieces back together.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from megatron_core.tensor_parallel.utils import shard_rows, unshard_rows
from neox.model.attention import num_kv_heads
from neox.model.mlp import ffn_size, is_gated


def partition_spec(cfg: Any, name: str) -> tuple[int | None, list[int] | None]:
    """(split dimension or None if replicated, section sizes or None) for plain parameter ``name``."""
    d = cfg.hidden_size // cfg.num_attention_heads
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return 0, None
    if re.search(r"attention\.query_key_value\.(weight|bias)$", name):
        nq, nkv = cfg.num_attention_heads, num_kv_heads(cfg)
        return 0, [nq * d, nkv * d, nkv * d]
    if re.search(r"mlp\.linear1\.(weight|bias)$", name):
        ffn = ffn_size(cfg)
        return 0, [ffn, ffn] if is_gated(cfg) else None
    if re.search(r"(attention\.dense|mlp\.linear2)\.weight$", name):
        return 1, None
    return None, None


def shard(cfg: Any, name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This tensor-parallel rank's piece of the full parameter ``name``."""
    dim, sections = partition_spec(cfg, name)
    return full if dim is None or tp == 1 else shard_rows(full, rank, tp, sections, dim=dim)


def unshard(cfg: Any, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full parameter ``name`` from every rank's piece (rank order)."""
    dim, sections = partition_spec(cfg, name)
    return shards[0] if dim is None or len(shards) == 1 else unshard_rows(shards, sections, dim=dim)
