"""neox <-> Hugging Face <-> Meta weight names and tensor transforms, shared by every converter.

"Full" weights use the neox parameter names of docs/internals.md (neox.model.layout) with
unsharded tensors in a layout that does not depend on the tensor-parallel size:

- ``attention.query_key_value``: rows ``[Q of all heads; K of all kv heads; V of all kv heads]``,
  each head's ``d`` rows in rotate-half order (as transformers' Llama);
- ``mlp.linear1`` of gated MLPs: rows ``[gate; up]``;
- ``embedding.word_embeddings`` / ``output_layer``: ``padded_vocab_size`` rows.

The fused sections are the model's own split declaration (``ParamLayout.split.sections``). The
family tables below are declarative: (neox sub-name, other names, kind), where kind says how one
neox tensor becomes the other family's tensors ('same', 'vocab', 'qkv', 'gated', 'qkv_heads').
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from neox.errors import CheckpointError, ConfigError
from neox.model.attention import head_dim, num_kv_heads
from neox.model.layout import model_layout

if TYPE_CHECKING:
    from neox.config.model import ModelConfig

Rule = tuple[str, tuple[str, ...], str]


def describe_key(key: str) -> str:
    """A config key as error messages name it (intermediate_size is compared after NeoX's derivation)."""
    if key == "intermediate_size":
        return "intermediate_size (per MLP branch after derivation; with activation: swiglu NeoX derives it as " \
               "round_up(int(intermediate_size * 2/3) // 2, mlp_multiple_of))"
    return key


# ---------------------------------------------------------------- vocabulary padding
def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Zero rows appended up to ``padded`` rows."""
    if t.shape[0] > padded:
        raise ConfigError(f"vocabulary of {t.shape[0]} rows does not fit padded_vocab_size {padded}")
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros((padded - t.shape[0], *t.shape[1:]))], dim=0)


def unpad_vocab(t: torch.Tensor, vocab: int) -> torch.Tensor:
    return t[:vocab]


# ---------------------------------------------------------------- Meta rotary order
def meta_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> rotate-half (transformers' convert_llama_weights_to_hf ``permute``)."""
    rows = w.shape[0]
    cols = w.shape[1] if w.dim() == 2 else 1
    out = w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return out.reshape(w.shape)


def rotate_half_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``meta_to_rotate_half``."""
    rows = w.shape[0]
    cols = w.shape[1] if w.dim() == 2 else 1
    out = w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
    return out.reshape(w.shape)


# ---------------------------------------------------------------- family tables
@dataclass(frozen=True)
class Family:
    """A checkpoint naming family: its top-level and per-layer rules and its layer prefix."""

    name: str
    top: tuple[Rule, ...]
    layer: tuple[Rule, ...]
    layer_prefix: str
    """Prefix of the other family's layer names, with ``{i}``."""
    meta_rotary: bool = False
    """Q and K rows use Meta's interleaved rotary pairs."""


def _wb(neox: str, other: tuple[str, ...], kind: str) -> tuple[Rule, Rule]:
    """A weight rule and its bias twin."""
    return (neox + ".weight", tuple(o + ".weight" for o in other), kind), (
        neox + ".bias", tuple(o + ".bias" for o in other), kind)


HF_LLAMA = Family(
    name="hf_llama",
    top=(
        ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        ("final_norm.weight", ("model.norm.weight",), "same"),
        ("output_layer.weight", ("lm_head.weight",), "vocab"),
    ),
    layer=(
        ("input_norm.weight", ("input_layernorm.weight",), "same"),
        *_wb("attention.query_key_value", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
        *_wb("attention.dense", ("self_attn.o_proj",), "same"),
        ("post_attention_norm.weight", ("post_attention_layernorm.weight",), "same"),
        *_wb("mlp.linear1", ("mlp.gate_proj", "mlp.up_proj"), "gated"),
        *_wb("mlp.linear2", ("mlp.down_proj",), "same"),
    ),
    layer_prefix="model.layers.{i}.",
)

META = Family(
    name="meta",
    top=(
        ("embedding.word_embeddings.weight", ("tok_embeddings.weight",), "vocab"),
        ("final_norm.weight", ("norm.weight",), "same"),
        ("output_layer.weight", ("output.weight",), "vocab"),
    ),
    layer=(
        ("input_norm.weight", ("attention_norm.weight",), "same"),
        ("attention.query_key_value.weight", ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"), "qkv"),
        ("attention.dense.weight", ("attention.wo.weight",), "same"),
        ("post_attention_norm.weight", ("ffn_norm.weight",), "same"),
        ("mlp.linear1.weight", ("feed_forward.w1.weight", "feed_forward.w3.weight"), "gated"),
        ("mlp.linear2.weight", ("feed_forward.w2.weight",), "same"),
    ),
    layer_prefix="layers.{i}.",
    meta_rotary=True,
)

HF_GPTNEOX = Family(
    name="hf_gpt_neox",
    top=(
        ("embedding.word_embeddings.weight", ("gpt_neox.embed_in.weight",), "vocab"),
        *_wb("final_norm", ("gpt_neox.final_layer_norm",), "same"),
        ("output_layer.weight", ("embed_out.weight",), "vocab"),
    ),
    layer=(
        *_wb("input_norm", ("input_layernorm",), "same"),
        *_wb("attention.query_key_value", ("attention.query_key_value",), "qkv_heads"),
        *_wb("attention.dense", ("attention.dense",), "same"),
        *_wb("post_attention_norm", ("post_attention_layernorm",), "same"),
        *_wb("mlp.linear1", ("mlp.dense_h_to_4h",), "same"),
        *_wb("mlp.linear2", ("mlp.dense_4h_to_h",), "same"),
    ),
    layer_prefix="gpt_neox.layers.{i}.",
)

# How Meta splits each tensor over its model-parallel shards (None: replicated).
META_SHARD_DIM: dict[str, int | None] = {
    "tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
    "attention_norm.weight": None, "ffn_norm.weight": None,
}


def meta_shard_dim(meta_name: str) -> int | None:
    """Meta's model-parallel split dimension of a (possibly per-layer) Meta name."""
    sub = meta_name.split(".", 2)[2] if meta_name.startswith("layers.") else meta_name
    if sub not in META_SHARD_DIM:
        raise CheckpointError(f"{meta_name}: not a LLaMA weight name Meta writes")
    return META_SHARD_DIM[sub]


def family_rules(family: Family, num_layers: int) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """Every (neox name, other names, kind), layers expanded."""
    yield from family.top
    for i in range(num_layers):
        p = family.layer_prefix.format(i=i)
        for neox, other, kind in family.layer:
            yield f"layers.{i}.{neox}", tuple(p + o for o in other), kind


# ---------------------------------------------------------------- tensor transforms
def _qkv_heads_to_fused(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF GPTNeoX's per-head [nh, 3, d] rows -> [Q; K; V]."""
    nh, d = cfg.num_attention_heads, head_dim(cfg)
    return t.reshape(nh, 3, d, -1).transpose(0, 1).reshape(t.shape)


def _fused_to_qkv_heads(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    nh, d = cfg.num_attention_heads, head_dim(cfg)
    return t.reshape(3, nh, d, -1).transpose(0, 1).reshape(t.shape)


def neox_to_other(t: torch.Tensor, kind: str, cfg: ModelConfig, family: Family, sections: tuple[int, ...] | None,
                  vocab_size: int | None = None) -> list[torch.Tensor]:
    """One full neox tensor -> the other family's tensors (in the order of the rule's names).

    ``sections``: the tensor's fused sections (its split declaration) for 'qkv' and 'gated'.
    """
    if kind == "vocab":
        return [unpad_vocab(t, vocab_size) if vocab_size else t]
    if kind == "same":
        return [t]
    if kind == "qkv_heads":
        if num_kv_heads(cfg) != cfg.num_attention_heads:
            raise ConfigError(f"num_kv_heads: GPTNeoX checkpoints need num_kv_heads == num_attention_heads, got {num_kv_heads(cfg)}")
        return [_fused_to_qkv_heads(t, cfg)]
    parts = list(torch.split(t, list(sections or [t.shape[0] // 2] * 2), dim=0))
    if kind == "qkv" and family.meta_rotary:
        parts[0] = rotate_half_to_meta(parts[0], cfg.num_attention_heads)
        parts[1] = rotate_half_to_meta(parts[1], num_kv_heads(cfg))
    return parts


def other_to_neox(parts: list[torch.Tensor], kind: str, cfg: ModelConfig, family: Family) -> torch.Tensor:
    """The other family's tensors of one rule -> the full neox tensor."""
    if kind == "vocab":
        return pad_vocab(parts[0], cfg.padded_vocab_size or parts[0].shape[0])
    if kind == "same":
        return parts[0]
    if kind == "qkv_heads":
        return _qkv_heads_to_fused(parts[0], cfg)
    if kind == "qkv" and family.meta_rotary:
        parts = [meta_to_rotate_half(parts[0], cfg.num_attention_heads),
                 meta_to_rotate_half(parts[1], num_kv_heads(cfg)), parts[2]]
    return torch.cat(parts, dim=0)


class LazyWeights(Mapping):
    """A read-only name -> tensor mapping whose tensors are built on access (streaming conversions)."""

    def __init__(self, makers: dict[str, Callable[[], torch.Tensor]]):
        self._makers = makers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._makers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


def from_family(source: Mapping[str, torch.Tensor], cfg: ModelConfig, family: Family) -> LazyWeights:
    """Full neox weights (lazy) from another family's full tensors; rules whose names are absent are skipped."""
    makers: dict[str, Callable[[], torch.Tensor]] = {}
    for neox, other, kind in family_rules(family, cfg.num_layers):
        if all(o in source for o in other):
            makers[neox] = (lambda o=other, k=kind: other_to_neox([source[n] for n in o], k, cfg, family))
        elif neox == "output_layer.weight" and cfg.no_weight_tying and other[0] not in source:
            raise CheckpointError(f"{other[0]}: missing, and the config sets no_weight_tying")
    return LazyWeights(makers)


def to_family(full: Mapping[str, torch.Tensor], cfg: ModelConfig, family: Family,
              vocab_size: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of another family from full neox weights, one neox tensor at a time."""
    layout = model_layout(cfg)
    for neox, other, kind in family_rules(family, cfg.num_layers):
        if neox not in full:
            continue
        split = layout[neox].split if neox in layout else None
        sections = split.sections if split is not None else None
        for name, t in zip(other, neox_to_other(full[neox], kind, cfg, family, sections, vocab_size)):
            yield name, t.contiguous()
