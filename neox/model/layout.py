"""The parameter table of docs/internals.md, read from the model itself.

Each megatron_core layer declares how its parameters split over the tensor-parallel ranks
(``tensor_splits()``); its initialisation cuts by that declaration. ``model_layout(cfg)`` builds
GPTModel on the meta device and returns ``{name: ParamLayout(full shape, split)}`` for every
parameter, so converters, the resharder, checkpoint checks and tests all read the one declaration
and cut or join tensors with ``megatron_core.tensor_parallel.utils.shard`` / ``unshard``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_core.tensor_parallel.utils import TensorSplit, group_world_size
from neox.model.gpt import GPTModel

if TYPE_CHECKING:
    from neox.config.model import ModelConfig


@dataclass(frozen=True)
class ParamLayout:
    """One parameter: its full (unsharded) shape and its split (None: replicated)."""

    shape: tuple[int | None, ...]
    """None for the vocabulary rows when the config has no padded_vocab_size yet."""
    split: TensorSplit | None


def layout_of(model: nn.Module, tp: int) -> dict[str, ParamLayout]:
    """The layout of every parameter of ``model``, whose tensors are one rank's shards of ``tp``."""
    splits: dict[str, TensorSplit] = {}
    for prefix, module in model.named_modules():
        declare = getattr(module, "tensor_splits", None)
        if callable(declare):
            for name, split in declare().items():
                splits[f"{prefix}.{name}" if prefix else name] = split
    out = {}
    for name, p in model.named_parameters():
        split = splits.get(name)
        shape = list(p.shape)
        if split is not None:
            shape[split.dim] *= tp
        out[name] = ParamLayout(tuple(shape), split)
    return out


VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
"""Parameters with ``padded_vocab_size`` rows."""


def model_layout(cfg: ModelConfig) -> dict[str, ParamLayout]:
    """The layout of GPTModel(cfg), built on the meta device (nothing allocated or initialised).

    Built at the tensor-parallel size parallel_state reports (1 outside a job); full shapes and
    splits do not depend on it. Without ``padded_vocab_size`` (a converter whose config names no
    tokenizer) the vocabulary rows are None.
    """
    tp = group_world_size(None)
    vocab_known = bool(cfg.padded_vocab_size)
    if not vocab_known:
        cfg = dataclasses.replace(cfg, padded_vocab_size=tp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # config warnings belong to the run, not to this table
        model = GPTModel(cfg, device=torch.device("meta"))
    layout = layout_of(model, tp)
    if not vocab_known:
        for name in VOCAB_PARAMS:
            if name in layout:
                layout[name] = dataclasses.replace(layout[name], shape=(None, *layout[name].shape[1:]))
    return layout


def full_shapes(layout: dict[str, ParamLayout]) -> dict[str, tuple[int | None, ...]]:
    """``{name: full shape}`` of a layout."""
    return {name: p.shape for name, p in layout.items()}
