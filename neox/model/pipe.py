"""GPTModelPipe: the GPTModel's modules as a DeepSpeed PipelineModule (``pipe_parallel_size >= 1``).

Layer indices follow GPT-NeoX's pipeline layout, so checkpoint files line up with NeoX's
(``layer_{idx:02d}-model_{tp:02d}-model_states.pt``):

    0          embedding            (TiedLayerSpec "embed" when the head is tied)
    1          no-op                (NeoX's _pre_transformer_block)
    2 .. L+1   transformer blocks
    L+2        no-op                (NeoX's _post_transformer_block)
    L+3        final norm
    L+4        output layer         (the tied embedding's weight when tied: no file of its own)

Batches are ``((input_ids, position_ids), (labels, loss_mask))``; activations travel between
stages as ``(hidden, position_ids)`` and each block recomputes its fp32 rotary tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch.utils.checkpoint import checkpoint

from megatron_core.tensor_parallel import ColumnParallelLinear, checkpoint_context_fn
from neox.model.embedding import Embedding
from neox.model.gpt import check_model_config, lm_logits, rotary_for, warn_partition_activations
from neox.model.init import ModelInit
from neox.model.loss import lm_loss
from neox.model.norms import Norm
from neox.model.transformer import TransformerBlock

if TYPE_CHECKING:
    from neox.config.model import ModelConfig

_FIRST_BLOCK = 2


class EmbeddingPipe(Embedding):
    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        input_ids, position_ids = inputs
        return super().forward(input_ids, position_ids), position_ids


class TransformerBlockPipe(TransformerBlock):
    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, position_ids = inputs
        return super().forward(x, rotary_for(self.cfg, position_ids)), position_ids


class FinalNormPipe(Norm):
    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return super().forward(inputs[0])


class OutputLayerPipe(ColumnParallelLinear):
    """The untied head: hidden [b, s, h] -> logits [b, s, V / tp]."""


def _identity(x: Any) -> Any:
    return x


def _tied_head(embedding: Embedding, x: torch.Tensor) -> torch.Tensor:
    return lm_logits(x, embedding.word_embeddings.weight, embedding.sequence_parallel, embedding.group)


def pipe_loss(logits: torch.Tensor, labels_and_mask: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    labels, loss_mask = labels_and_mask
    return lm_loss(logits, labels, loss_mask)


def _checkpoint(fn: Any, *args: Any) -> Any:
    return checkpoint(fn, *args, use_reentrant=False, context_fn=checkpoint_context_fn)


def _final_norm_spec(cfg: ModelConfig, kw: dict) -> LayerSpec:
    eps = cfg.rms_norm_epsilon if cfg.norm == "rmsnorm" else cfg.layernorm_epsilon
    return LayerSpec(FinalNormPipe, cfg.norm, cfg.hidden_size, eps, bias=cfg.use_bias_in_norms, **kw)


class GPTModelPipe(PipelineModule):
    """The same modules and numerics as GPTModel, as DeepSpeed LayerSpecs."""

    def __init__(self, cfg: ModelConfig, *, topology: Any, sequence_parallel: bool = False, seed: int = 1234,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 partition_method: str = "type:transformer|mlp") -> None:
        from megatron_core.tensor_parallel.utils import group_world_size

        check_model_config(cfg, group_world_size(None))

        self.cfg, self.num_layers = cfg, cfg.num_layers
        sp = sequence_parallel and group_world_size(None) > 1
        init = ModelInit(cfg, seed)
        kw = dict(sequence_parallel=sp, device=device, dtype=dtype)
        tied = not cfg.no_weight_tying
        emb = (TiedLayerSpec("embed", EmbeddingPipe, cfg, init, tied_weight_attr="word_embeddings.weight", **kw)
               if tied else LayerSpec(EmbeddingPipe, cfg, init, **kw))
        specs: list[Any] = [emb, _identity]
        specs += [LayerSpec(TransformerBlockPipe, cfg, i, init, **kw) for i in range(cfg.num_layers)]
        specs += [_identity, _final_norm_spec(cfg, kw)]
        if tied:
            specs.append(TiedLayerSpec("embed", EmbeddingPipe, cfg, init, forward_fn=_tied_head,
                                       tied_weight_attr="word_embeddings.weight", **kw))
        else:
            specs.append(LayerSpec(OutputLayerPipe, cfg.hidden_size, cfg.padded_vocab_size, bias=False,
                                   init_method=init("output_layer.weight"), **kw))
        interval = cfg.checkpoint_num_layers if cfg.checkpoint_activations else 0
        if interval:
            warn_partition_activations(cfg)
        super().__init__(
            layers=specs, topology=topology, loss_fn=pipe_loss, partition_method=partition_method,
            activation_checkpoint_interval=interval, activation_checkpoint_func=_checkpoint,
            checkpointable_layers=["TransformerBlockPipe"],
        )
        # DeepSpeed's engine computes these; a bare forward (tools, tests) needs them too.
        self._precompute_checkpointable_values()

    def plain_named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """This stage's parameters under their GPTModel names."""
        for name, p in self.named_parameters():
            m = re.match(r"(?:tied_modules\.embed|(\d+))\.(.+)$", name)
            if m is None:
                raise ValueError(f"unexpected pipeline parameter {name}")
            idx = int(m[1]) if m[1] is not None else 0
            yield pipe_to_plain_key(idx, m[2], self.num_layers), p


def plain_to_pipe_key(name: str, num_layers: int) -> tuple[int, str]:
    """GPTModel parameter name -> (pipeline layer index, name inside that layer)."""
    if name.startswith("embedding."):
        return 0, name[len("embedding."):]
    m = re.match(r"layers\.(\d+)\.(.+)$", name)
    if m:
        return int(m[1]) + _FIRST_BLOCK, m[2]
    if name.startswith("final_norm."):
        return num_layers + 3, name[len("final_norm."):]
    if name.startswith("output_layer."):
        return num_layers + 4, name[len("output_layer."):]
    raise ValueError(f"not a GPTModel parameter name: {name}")


def pipe_to_plain_key(layer_index: int, sub_name: str, num_layers: int) -> str:
    """(pipeline layer index, name inside the layer) -> GPTModel parameter name."""
    if layer_index == 0:
        return "embedding." + sub_name
    if _FIRST_BLOCK <= layer_index < num_layers + _FIRST_BLOCK:
        return f"layers.{layer_index - _FIRST_BLOCK}.{sub_name}"
    if layer_index == num_layers + 3:
        return "final_norm." + sub_name
    if layer_index == num_layers + 4:
        return "output_layer." + sub_name
    raise ValueError(f"pipeline layer {layer_index} holds no parameters in a {num_layers}-layer model")


__all__ = ["GPTModelPipe", "pipe_loss", "pipe_to_plain_key", "plain_to_pipe_key"]
