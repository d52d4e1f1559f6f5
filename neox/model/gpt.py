"""GPTModel: embedding, transformer blocks, final norm and the (vocab-parallel) output layer.

One module covers LLaMA (rmsnorm, SwiGLU, rotary, GQA, untied head) and classic GPT-NeoX
(layernorm, GeLU, biases, gpt_j_residual, learned or partial rotary positions, tied embeddings);
the config decides. Works in one process without torch.distributed (tensor parallel size 1).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

from megatron_core.tensor_parallel import (
    ColumnParallelLinear,
    checkpoint_context_fn,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron_core.tensor_parallel.utils import group_world_size
from neox.config.validate import validate_model
from neox.errors import ConfigError
from neox.model.attention import num_kv_heads
from neox.model.embedding import Embedding
from neox.model.init import ModelInit
from neox.model.kv_cache import KVCache
from neox.model.norms import build_norm
from neox.model.rotary import rotary_cos_sin, rotary_dim
from neox.model.transformer import TransformerBlock

if TYPE_CHECKING:
    from neox.config.model import ModelConfig


def check_model_config(cfg: ModelConfig, model_parallel_size: int = 1) -> None:
    """The config's model rules (``neox.config.validate``), for a ModelConfig built directly, and the
    vocabulary size a model needs and a read config may not know yet (no tokenizer at a dry run)."""
    validate_model(cfg, model_parallel_size)
    if not cfg.padded_vocab_size:
        raise ConfigError(f"padded_vocab_size: expected a positive integer, got {cfg.padded_vocab_size!r} "
                          "(it is derived from the tokenizer's vocabulary)")


def rotary_for(cfg: ModelConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp32 cos/sin [b, s, rotary_dim] for ``position_ids``, or None without rotary embeddings."""
    if cfg.pos_emb != "rotary":
        return None
    dim = rotary_dim(cfg.hidden_size // cfg.num_attention_heads, cfg.rotary_pct)
    return rotary_cos_sin(position_ids, dim, cfg.rotary_emb_base)


def lm_logits(x: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool, group: ProcessGroup | None = None) -> torch.Tensor:
    """Vocab-parallel logits [b, s, V/tp] with a (tied) embedding weight [V/tp, h]."""
    if sequence_parallel:
        x = gather_from_sequence_parallel_region(x, 1, group, tensor_parallel_output_grad=True)
    else:
        x = copy_to_tensor_model_parallel_region(x, group)
    return F.linear(x, weight)


def warn_partition_activations(cfg: ModelConfig) -> None:
    if cfg.partition_activations:
        warnings.warn(
            "partition_activations is not honoured: checkpointed activations are kept whole on each tensor-parallel rank",
            stacklevel=3,
        )


class GPTModel(nn.Module):
    """input_ids [b, s] -> logits [b, s, padded_vocab_size / tp] (this rank's vocabulary slice)."""

    def __init__(self, cfg: ModelConfig, *, sequence_parallel: bool = False, seed: int = 1234,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        check_model_config(cfg, group_world_size(None))
        self.cfg = cfg
        self.sequence_parallel = sequence_parallel and group_world_size(None) > 1
        init = ModelInit(cfg, seed)
        kw = dict(sequence_parallel=self.sequence_parallel, device=device, dtype=dtype)
        self.embedding = Embedding(cfg, init, **kw)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i, init, **kw) for i in range(cfg.num_layers))
        self.final_norm = build_norm(cfg, **kw)
        self.tied = not cfg.no_weight_tying
        if not self.tied:
            self.output_layer = ColumnParallelLinear(
                cfg.hidden_size, cfg.padded_vocab_size, bias=False, init_method=init("output_layer.weight"), **kw
            )
        self.checkpoint_activations = cfg.checkpoint_activations
        self.checkpoint_num_layers = max(1, cfg.checkpoint_num_layers)
        if cfg.checkpoint_activations:
            warn_partition_activations(cfg)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, *, last_only: bool = False) -> torch.Tensor:
        """``last_only``: logits of the last position only, [b, 1, V / tp] (a prompt before decoding needs no
        others); with sequence parallelism, where each rank holds a slice of the positions, all of them."""
        b, s = input_ids.shape
        if position_ids is None and kv_cache is not None:
            position_ids = kv_cache.positions(b, s, input_ids.device)
        elif position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        x = self.embedding(input_ids, position_ids)  # [b, s, h]
        rotary = rotary_for(self.cfg, position_ids)
        x = self._layers(x, rotary, kv_cache)
        if kv_cache is not None:
            kv_cache.advance()
        if last_only and not self.sequence_parallel:
            x = x[:, -1:]
        x = self.final_norm(x)
        if self.tied:
            return lm_logits(x, self.embedding.word_embeddings.weight, self.sequence_parallel)
        return self.output_layer(x)

    def _layers(self, x: torch.Tensor, rotary: Any, kv_cache: KVCache | None) -> torch.Tensor:
        use_ckpt = self.checkpoint_activations and self.training and torch.is_grad_enabled() and kv_cache is None
        if not use_ckpt:
            for layer in self.layers:
                x = layer(x, rotary, kv_cache)
            return x
        n = self.checkpoint_num_layers
        for start in range(0, len(self.layers), n):
            chunk = self.layers[start:start + n]
            x = checkpoint(_run_chunk, chunk, x, rotary, use_reentrant=False, context_fn=checkpoint_context_fn)
        return x

    def allocate_kv_cache(self, batch_size: int, max_length: int, *, device: torch.device | str | None = None,
                          dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for this rank's KV heads, on the model's device and dtype by default."""
        p = self.final_norm.weight
        attn = self.layers[0].attention
        return KVCache.allocate(
            len(self.layers), batch_size, max_length, attn.nkv, attn.head_dim,
            device=device or p.device, dtype=dtype or p.dtype,
        )

    def num_kv_heads(self) -> int:
        return num_kv_heads(self.cfg)


def _run_chunk(chunk: nn.ModuleList, x: torch.Tensor, rotary: Any) -> torch.Tensor:
    for layer in chunk:
        x = layer(x, rotary)
    return x
