"""One transformer block: pre-norm sequential, or GPT-J parallel residual (attention and MLP side by side)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from megatron_core.tensor_parallel.utils import group_world_size
from neox.model.attention import Attention
from neox.model.embedding import hidden_dropout
from neox.model.kv_cache import KVCache
from neox.model.mlp import MLP
from neox.model.norms import build_norm

if TYPE_CHECKING:
    from neox.config.model import ModelConfig


class TransformerBlock(nn.Module):
    """hidden [b, s, h] -> [b, s, h] (s / tp under sequence parallelism).

    Sequential:  x = x + attn(input_norm(x));  x = x + mlp(post_attention_norm(x))
    gpt_j:       x = x + attn(input_norm(x)) + mlp(post_attention_norm(x))   (input_norm twice if gpt_j_tied)
    """

    def __init__(self, cfg: ModelConfig, layer: int, init: Any, *, sequence_parallel: bool = False, group: ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        prefix = f"layers.{layer}."
        sp = sequence_parallel and group_world_size(group) > 1
        kw = dict(sequence_parallel=sp, group=group, device=device, dtype=dtype)
        self.layer, self.cfg = layer, cfg
        self.input_norm = build_norm(cfg, **kw)
        self.attention = Attention(cfg, layer, prefix + "attention.", init, **kw)
        self.post_attention_norm = build_norm(cfg, **kw)
        self.mlp = MLP(cfg, prefix + "mlp.", init, **kw)
        self.gpt_j_residual, self.gpt_j_tied = cfg.gpt_j_residual, cfg.gpt_j_tied
        self.dropout, self.sequence_parallel = cfg.hidden_dropout, sp

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return hidden_dropout(x, self.dropout, self.training, self.sequence_parallel)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        if self.gpt_j_residual:
            attn = self.attention(self.input_norm(x), rotary, kv_cache)
            mlp_in = self.input_norm(x) if self.gpt_j_tied else self.post_attention_norm(x)
            return x + self._drop(attn) + self._drop(self.mlp(mlp_in))
        x = x + self._drop(self.attention(self.input_norm(x), rotary, kv_cache))
        return x + self._drop(self.mlp(self.post_attention_norm(x)))
