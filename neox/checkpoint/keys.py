"""neox <-> Hugging Face <-> Meta weight names and tensor layouts, shared by every converter.

"Full" weights (what ``read_full_weights`` returns and ``write_weights`` takes) use the neox
parameter names of docs/internals.md with unsharded tensors in a layout that does not depend on
the tensor-parallel size:

- ``attention.query_key_value``: rows ``[Q of all heads; K of all kv heads; V of all kv heads]``,
  each head's ``d`` rows in rotate-half order (as transformers' Llama);
- ``mlp.linear1`` of gated MLPs: rows ``[gate; up]``;
- ``embedding.word_embeddings`` / ``output_layer``: ``padded_vocab_size`` rows.

A TP shard ``r`` of the fused tensors is ``[Q_r; K_r; V_r]`` / ``[gate_r; up_r]`` (internals.md).
The family tables below are declarative: (neox sub-name, other names, kind), where kind says how
one neox tensor becomes the other family's tensors ('same', 'vocab', 'qkv', 'gated', 'qkv_heads').
``read_full_weights`` / ``write_weights`` read and write DeepSpeed's layouts (docs/internals.md).
"""

from __future__ import annotations

import pickle
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from neox.errors import CheckpointError, ConfigError

Rule = tuple[str, tuple[str, ...], str]

GATED_ACTIVATIONS = ("swiglu", "geglu", "reglu")


# ---------------------------------------------------------------- model shape helpers
def is_gated(cfg: Any) -> bool:
    """True when mlp.linear1 holds [gate; up] (llama MLP or a *glu activation)."""
    return cfg.mlp_type == "llama" or cfg.activation in GATED_ACTIVATIONS


def mlp_has_bias(cfg: Any) -> bool:
    """NeoX's LLaMA MLP has no biases whatever use_bias_in_mlp says (as neox.model.mlp)."""
    return cfg.use_bias_in_mlp and cfg.mlp_type != "llama"


def num_kv_heads(cfg: Any) -> int:
    if getattr(cfg, "attention_type", "multihead") == "multiquery":
        return 1
    return cfg.num_kv_heads or cfg.num_attention_heads


def head_dim(cfg: Any) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


def ffn_size(cfg: Any) -> int:
    """MLP inner size per branch (the model's own rule when intermediate_size is not set)."""
    if cfg.intermediate_size:
        return cfg.intermediate_size
    from neox.model.mlp import ffn_size as model_ffn_size

    return model_ffn_size(cfg)


def describe_key(key: str) -> str:
    """A config key as error messages name it (intermediate_size is compared after NeoX's derivation)."""
    if key == "intermediate_size":
        return "intermediate_size (per MLP branch after derivation; with activation: swiglu NeoX derives it as " \
               "round_up(int(intermediate_size * 2/3) // 2, mlp_multiple_of))"
    return key


def qkv_sizes(cfg: Any) -> tuple[int, int, int]:
    """Rows of Q, K and V in the full fused qkv tensor."""
    d = head_dim(cfg)
    return cfg.num_attention_heads * d, num_kv_heads(cfg) * d, num_kv_heads(cfg) * d


def expected_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every neox parameter the config builds."""
    h, ffn, vocab = cfg.hidden_size, ffn_size(cfg), cfg.padded_vocab_size
    norm_bias = cfg.norm == "layernorm" and cfg.use_bias_in_norms
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (vocab, h)}
    if cfg.pos_emb == "learned":
        shapes["embedding.position_embeddings.weight"] = (cfg.max_position_embeddings or cfg.seq_length, h)
    qkv_rows = sum(qkv_sizes(cfg))
    lin1_rows = 2 * ffn if is_gated(cfg) else ffn
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        layer = {
            "input_norm": (h,), "post_attention_norm": (h,),
            "attention.query_key_value": (qkv_rows, h), "attention.dense": (h, cfg.num_attention_heads * head_dim(cfg)),
            "mlp.linear1": (lin1_rows, h), "mlp.linear2": (h, ffn),
        }
        bias = {
            "input_norm": norm_bias, "post_attention_norm": norm_bias,
            "attention.query_key_value": cfg.use_bias_in_attn_linear, "attention.dense": cfg.use_bias_in_attn_linear,
            "mlp.linear1": mlp_has_bias(cfg), "mlp.linear2": mlp_has_bias(cfg),
        }
        for sub, shape in layer.items():
            shapes[p + sub + ".weight"] = shape
            if bias[sub]:
                shapes[p + sub + ".bias"] = (shape[0],)
    shapes["final_norm.weight"] = (h,)
    if norm_bias:
        shapes["final_norm.bias"] = (h,)
    if cfg.no_weight_tying:
        shapes["output_layer.weight"] = (vocab, h)
    return shapes


# ---------------------------------------------------------------- tensor-parallel layout
def tp_kind(name: str, cfg: Any) -> str:
    """How a neox parameter is split over TP ranks: 'rows', 'cols', 'qkv', 'gated' or 'replicated'."""
    if ".attention.query_key_value." in name:
        return "qkv"
    if ".mlp.linear1." in name:
        return "gated" if is_gated(cfg) else "rows"
    if name.endswith((".attention.dense.weight", ".mlp.linear2.weight")):
        return "cols"
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "rows"
    return "replicated"


def _split_sizes(name: str, cfg: Any) -> list[int] | None:
    kind = tp_kind(name, cfg)
    if kind == "qkv":
        return list(qkv_sizes(cfg))
    if kind == "gated":
        return [ffn_size(cfg), ffn_size(cfg)]
    return None


def _chunk(t: torch.Tensor, tp: int, dim: int, name: str) -> list[torch.Tensor]:
    if t.shape[dim] % tp:
        raise CheckpointError(f"{name}: dimension {dim} of size {t.shape[dim]} does not divide by tensor-parallel size {tp}")
    return list(torch.chunk(t, tp, dim=dim))


def shard_tensor(name: str, full: torch.Tensor, cfg: Any, tp: int) -> list[torch.Tensor]:
    """The ``tp`` shards of a full neox tensor (contiguous copies, safe to torch.save)."""
    kind = tp_kind(name, cfg)
    if kind == "replicated" or tp == 1:
        return [full.clone() for _ in range(tp)]
    if kind in ("rows", "cols"):
        return [s.contiguous().clone() for s in _chunk(full, tp, 0 if kind == "rows" else 1, name)]
    parts = torch.split(full, _split_sizes(name, cfg), dim=0)
    per_part = [_chunk(p, tp, 0, name) for p in parts]
    return [torch.cat([chunks[r] for chunks in per_part], dim=0) for r in range(tp)]


def unshard_tensors(name: str, shards: list[torch.Tensor], cfg: Any) -> torch.Tensor:
    """Inverse of ``shard_tensor``."""
    tp = len(shards)
    kind = tp_kind(name, cfg)
    if kind == "replicated" or tp == 1:
        return shards[0]
    if kind in ("rows", "cols"):
        return torch.cat(shards, dim=0 if kind == "rows" else 1)
    sizes = [s // tp for s in _split_sizes(name, cfg)]
    split = [torch.split(s, sizes, dim=0) for s in shards]
    return torch.cat([split[r][j] for j in range(len(sizes)) for r in range(tp)], dim=0)


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
def _qkv_heads_to_fused(t: torch.Tensor, cfg: Any) -> torch.Tensor:
    """HF GPTNeoX's per-head [nh, 3, d] rows -> [Q; K; V]."""
    nh, d = cfg.num_attention_heads, head_dim(cfg)
    return t.reshape(nh, 3, d, -1).transpose(0, 1).reshape(t.shape)


def _fused_to_qkv_heads(t: torch.Tensor, cfg: Any) -> torch.Tensor:
    nh, d = cfg.num_attention_heads, head_dim(cfg)
    return t.reshape(3, nh, d, -1).transpose(0, 1).reshape(t.shape)


def neox_to_other(neox_name: str, t: torch.Tensor, kind: str, cfg: Any, family: Family,
                  vocab_size: int | None = None) -> list[torch.Tensor]:
    """One full neox tensor -> the other family's tensors (in the order of the rule's names)."""
    if kind == "vocab":
        return [unpad_vocab(t, vocab_size) if vocab_size else t]
    if kind == "same":
        return [t]
    if kind == "qkv_heads":
        if num_kv_heads(cfg) != cfg.num_attention_heads:
            raise ConfigError(f"num_kv_heads: GPTNeoX checkpoints need num_kv_heads == num_attention_heads, got {num_kv_heads(cfg)}")
        return [_fused_to_qkv_heads(t, cfg)]
    parts = list(torch.split(t, _split_sizes(neox_name, cfg) or [t.shape[0] // 2] * 2, dim=0))
    if kind == "qkv" and family.meta_rotary:
        parts[0] = rotate_half_to_meta(parts[0], cfg.num_attention_heads)
        parts[1] = rotate_half_to_meta(parts[1], num_kv_heads(cfg))
    return parts


def other_to_neox(parts: list[torch.Tensor], kind: str, cfg: Any, family: Family) -> torch.Tensor:
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


def from_family(source: Mapping[str, torch.Tensor], cfg: Any, family: Family) -> LazyWeights:
    """Full neox weights (lazy) from another family's full tensors; rules whose names are absent are skipped."""
    makers: dict[str, Callable[[], torch.Tensor]] = {}
    for neox, other, kind in family_rules(family, cfg.num_layers):
        if all(o in source for o in other):
            makers[neox] = (lambda o=other, k=kind: other_to_neox([source[n] for n in o], k, cfg, family))
        elif neox == "output_layer.weight" and cfg.no_weight_tying and other[0] not in source:
            raise CheckpointError(f"{other[0]}: missing, and the config sets no_weight_tying")
    return LazyWeights(makers)


def to_family(full: Mapping[str, torch.Tensor], cfg: Any, family: Family,
              vocab_size: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of another family from full neox weights, one neox tensor at a time."""
    for neox, other, kind in family_rules(family, cfg.num_layers):
        if neox not in full:
            continue
        for name, t in zip(other, neox_to_other(neox, full[neox], kind, cfg, family, vocab_size)):
            yield name, t.contiguous()


def check_shapes(full: Mapping[str, torch.Tensor], cfg: Any, source: str) -> None:
    """CheckpointError naming every missing name or wrong shape against the config."""
    problems = []
    for name, shape in expected_shapes(cfg).items():
        if name not in full:
            problems.append(f"{name} missing")
        elif None not in shape and tuple(full[name].shape) != shape:
            problems.append(f"{name} has shape {tuple(full[name].shape)}, config expects {shape}")
    if problems:
        raise CheckpointError(f"{source}: does not match the config: " + "; ".join(problems[:8])
                              + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))


# ---------------------------------------------------------------- DeepSpeed layouts on disk
_PIPE_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def resolve_tag_dir(path: str | Path) -> Path:
    """``{load}`` with a ``latest`` file -> ``{load}/{tag}``; a tag directory is returned as is."""
    p = Path(path)
    if (p / "latest").is_file():
        tag = (p / "latest").read_text().strip()
        if not (p / tag).is_dir():
            raise CheckpointError(f"{p / 'latest'}: names tag {tag!r}, but {p / tag} does not exist")
        return p / tag
    if p.is_dir() and any(_MP_FILE.search(f.name) or _PIPE_FILE.search(f.name) for f in p.iterdir()):
        return p
    raise CheckpointError(f"{p}: expected a 'latest' file or DeepSpeed model files "
                          "(mp_rank_XX_model_states.pt or layer_XX-model_YY-model_states.pt)")


def load_tensors(path: Path) -> Any:
    """torch.load on CPU, weights only, memory-mapped when the file allows it (tensors read on use)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: holds objects other than tensors and plain containers ({err})") from err


def _read_shards(tag_dir: Path, cfg: Any) -> list[dict[str, torch.Tensor]]:
    """One {neox name: tensor} dict per TP rank, from either layout."""
    pipe = [(int(m[1]), int(m[2]), f) for f in tag_dir.iterdir() if (m := _PIPE_FILE.search(f.name))]
    if pipe:
        from neox.model.pipe import pipe_to_plain_key

        tp = 1 + max(r for _, r, _ in pipe)
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        for idx, r, f in sorted(pipe):
            for sub, t in load_tensors(f).items():
                if isinstance(t, torch.Tensor):
                    shards[r][pipe_to_plain_key(idx, sub, cfg.num_layers)] = t
        return shards
    files = sorted((int(m[1]), f) for f in tag_dir.iterdir() if (m := _MP_FILE.search(f.name)))
    if not files:
        zero = list(tag_dir.glob("zero_pp_rank_*_model_states.pt"))
        hint = " (ZeRO-3 partitions weights: run DeepSpeed's zero_to_fp32.py first)" if zero else ""
        raise CheckpointError(f"{tag_dir}: no mp_rank_XX_model_states.pt files{hint}")
    shards = []
    for _, f in files:
        module = load_tensors(f).get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{f}: 'module' holds no weights and no layer_XX files are present")
        shards.append({k: v for k, v in module.items() if isinstance(v, torch.Tensor)})
    return shards


def read_full_weights(ckpt_dir: str | Path, cfg: Any) -> LazyWeights:
    """Full neox weights of a DeepSpeed checkpoint (plain or pipeline files, any TP/PP), unsharded on access.

    ``ckpt_dir`` is a ``load`` directory (with ``latest``) or a tag directory. Tensors are memory-mapped,
    so peak memory is about one full tensor per access.
    """
    tag_dir = resolve_tag_dir(ckpt_dir)
    shards = _read_shards(tag_dir, cfg)
    names = list(shards[0])
    for r, s in enumerate(shards):
        if set(s) != set(names):
            raise CheckpointError(f"{tag_dir}: TP rank {r} has different parameter names than rank 0")
    return LazyWeights({n: (lambda n=n: unshard_tensors(n, [s[n] for s in shards], cfg)) for n in names})


def shard_for_rank(name: str, full: torch.Tensor, cfg: Any, tp: int, rank: int) -> torch.Tensor:
    """TP shard ``rank`` of a full neox tensor (a contiguous copy)."""
    if tp_kind(name, cfg) == "replicated" or tp == 1:
        return full.contiguous().clone()
    return shard_tensor(name, full, cfg, tp)[rank]


def _ds_states(module: dict | None, tp: int, iteration: int) -> dict[str, Any]:
    """The keys DeepSpeed's load_checkpoint reads from mp_rank_XX_model_states.pt."""
    return {"module": module, "buffer_names": [], "optimizer": None, "lr_scheduler": None,
            "sparse_tensor_module_names": [], "skipped_steps": 0, "global_steps": iteration,
            "global_samples": 0, "dp_world_size": 1, "mp_world_size": tp, "iteration": iteration}


def _checked(name: str, t: torch.Tensor, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype | None) -> torch.Tensor:
    if name in shapes and None not in shapes[name] and tuple(t.shape) != shapes[name]:
        raise CheckpointError(f"{name}: shape {tuple(t.shape)} does not match the config's {shapes[name]}")
    return t.to(dtype) if dtype is not None else t


def write_weights(full: Mapping[str, torch.Tensor], cfg: Any, out_dir: str | Path, tp: int, pp: int, *,
                  tag: str = "global_step0", dtype: torch.dtype | None = None, iteration: int = 0,
                  progress: bool = True) -> Path:
    """Write full neox weights as a DeepSpeed checkpoint ``{out_dir}/{tag}`` plus ``{out_dir}/latest``.

    ``pp == 0`` writes one ``mp_rank_XX_model_states.pt`` per TP rank (weights under ``"module"``), one
    rank at a time; ``pp >= 1`` writes ``layer_XX-model_YY-model_states.pt`` files (the file names do not
    depend on the number of stages) one layer at a time. Either loads with
    ``load_checkpoint(load_module_only=True)``. Returns the tag directory.
    """
    shapes = expected_shapes(cfg)
    missing = [n for n in shapes if n not in full]
    if missing:
        raise CheckpointError(f"weights for {out_dir}: missing {', '.join(missing[:6])}")
    tag_dir = Path(out_dir) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    start, nbytes = time.perf_counter(), 0
    bar = tqdm(total=len(full) * tp, desc=f"writing {tag_dir}", unit="tensor", disable=not progress)
    if pp == 0:
        for r in range(tp):
            module = {}
            for n in full:
                module[n] = shard_for_rank(n, _checked(n, full[n], shapes, dtype), cfg, tp, r)
                nbytes += module[n].nbytes
                bar.update()
            torch.save(_ds_states(module, tp, iteration), tag_dir / f"mp_rank_{r:02d}_model_states.pt")
            del module
    else:
        from neox.model.pipe import plain_to_pipe_key

        layers: dict[int, list[tuple[str, str]]] = {}
        for n in full:
            idx, sub = plain_to_pipe_key(n, cfg.num_layers)
            layers.setdefault(idx, []).append((n, sub))
        for idx in sorted(layers):
            tensors = {n: _checked(n, full[n], shapes, dtype) for n, _ in layers[idx]}
            for r in range(tp):
                sd = {sub: shard_for_rank(n, tensors[n], cfg, tp, r) for n, sub in layers[idx]}
                nbytes += sum(t.nbytes for t in sd.values())
                torch.save(sd, tag_dir / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
                bar.update(len(sd))
        for r in range(tp):
            torch.save(_ds_states(None, tp, iteration), tag_dir / f"mp_rank_{r:02d}_model_states.pt")
    bar.close()
    (Path(out_dir) / "latest").write_text(tag)
    secs = time.perf_counter() - start
    if progress:
        print(f"wrote {nbytes / 2**30:.2f} GiB in {secs:.1f} s ({nbytes / 2**20 / max(secs, 1e-9):.0f} MiB/s) "
              f"to {tag_dir} (tp={tp}, pp={pp})")
    return tag_dir
