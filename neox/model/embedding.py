"""Token embeddings (vocab-parallel) plus optional learned absolute positions, then dropout."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megatron_core.tensor_parallel import (
    VocabParallelEmbedding,
    fork_model_parallel_rng,
    scatter_to_sequence_parallel_region,
)
from megatron_core.tensor_parallel.utils import group_world_size

if TYPE_CHECKING:
    from neox.config.model import ModelConfig


def residual_stream(x: torch.Tensor, fp32_residual: bool) -> torch.Tensor:
    """The embedding output in the residual stream's dtype.

    Under torch.autocast with fp32 parameters the embedding lookup is fp32, and left alone every
    residual add and norm after it would run in fp32 too. Megatron keeps the stream in the compute
    dtype unless ``fp32_residual_connection``; so does this.
    """
    kind = x.device.type
    if not fp32_residual and torch.is_autocast_enabled(kind) and x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(kind))
    return x


def hidden_dropout(x: torch.Tensor, p: float, training: bool, split_across_ranks: bool) -> torch.Tensor:
    """Dropout on hidden states; when they are split over tensor ranks (sequence parallel) each
    rank needs its own mask, drawn from the model-parallel RNG stream."""
    if p == 0.0 or not training:
        return x
    if split_across_ranks:
        with fork_model_parallel_rng():
            return F.dropout(x, p, training=True)
    return F.dropout(x, p, training=True)


class Embedding(nn.Module):
    """input_ids [b, s] -> hidden [b, s, h] (or [b, s / tp, h] with sequence parallelism)."""

    def __init__(self, cfg: ModelConfig, init: Any, *, sequence_parallel: bool = False, group: ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.word_embeddings = VocabParallelEmbedding(
            cfg.padded_vocab_size, h, init_method=init("embedding.word_embeddings.weight"), group=group,
            device=device, dtype=dtype,
        )
        if cfg.pos_emb == "learned":
            max_pos = cfg.max_position_embeddings or cfg.seq_length
            # _weight skips nn.Embedding's own normal_ init: it is overwritten below or left on meta.
            weight = torch.empty(max_pos, h, device=device, dtype=dtype or torch.float32)
            self.position_embeddings = nn.Embedding(max_pos, h, _weight=weight)
            if self.position_embeddings.weight.device.type != "meta":
                full = torch.empty(max_pos, h)
                init("embedding.position_embeddings.weight")(full)
                with torch.no_grad():
                    self.position_embeddings.weight.copy_(full)
        else:
            self.position_embeddings = None
        self.dropout, self.fp32_residual = cfg.hidden_dropout, cfg.fp32_residual_connection
        self.sequence_parallel = sequence_parallel and group_world_size(group) > 1
        self.group = group

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        x = residual_stream(x, self.fp32_residual)
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, 1, self.group)
        return hidden_dropout(x, self.dropout, self.training, self.sequence_parallel)
