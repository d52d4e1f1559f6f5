"""Derived values, computed as GPT-NeoX computes them. Pure functions of the flat values.

``derive_all(values, world_size, vocab_size)`` fills in what the user left out and normalises NeoX's
alternative spellings, so that deriving an already derived config changes nothing (ranks re-derive
the flat config they receive with their own WORLD_SIZE).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from neox.errors import ConfigError

# gated activation (current NeoX spelling) -> the activation applied to the gate
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
PRECISION_ALIASES = {"bf16": "bfloat16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def key_error(keys: str | tuple[str, ...], message: str) -> ConfigError:
    """A ConfigError about ``keys`` (the first one names the file the caller reports)."""
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    err = ConfigError(f"{keys[0]}: {message}")
    err.keys = keys  # type: ignore[attr-defined]
    err.detail = message  # type: ignore[attr-defined]
    return err


def data_parallel_size(world_size: int, model_parallel_size: int, pipe_parallel_size: int) -> int:
    """dp = world / (mp * max(pp, 1)); the sizes must divide."""
    model_ranks = model_parallel_size * max(pipe_parallel_size, 1)
    if model_ranks <= 0 or world_size % model_ranks:
        raise key_error(
            ("model_parallel_size", "pipe_parallel_size"),
            f"world size {world_size} is not divisible by model_parallel_size ({model_parallel_size}) "
            f"* max(pipe_parallel_size, 1) ({max(pipe_parallel_size, 1)})",
        )
    return world_size // model_ranks


def batch_triple(
    train_batch: int | None, micro_batch: int | None, grad_acc: int | None, dp: int
) -> tuple[int, int, int]:
    """(train_batch_size, micro_batch_per_gpu, gradient_accumulation_steps) from any two (or one) of them.

    As NeoX: with only the global batch, accumulation is 1; with only the micro-batch, accumulation is 1;
    with none, micro-batch 1 (NeoX refuses; a model-only config should still resolve for a dry run).
    """
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    for key, value in zip(keys, (train_batch, micro_batch, grad_acc)):
        if value is not None and value <= 0:
            raise key_error(key, f"expected a positive integer, got {value}")
    if train_batch is not None and micro_batch is not None and grad_acc is not None:
        if train_batch != micro_batch * grad_acc * dp:
            raise key_error(
                keys,
                f"train_batch_size ({train_batch}) != train_micro_batch_size_per_gpu ({micro_batch}) * "
                f"gradient_accumulation_steps ({grad_acc}) * data-parallel size ({dp})",
            )
        return train_batch, micro_batch, grad_acc
    if train_batch is not None:
        if micro_batch is None and grad_acc is None:
            grad_acc = 1
        if micro_batch is None:
            micro_batch, rem = divmod(train_batch, grad_acc * dp)
        else:
            grad_acc, rem = divmod(train_batch, micro_batch * dp)
        if rem or micro_batch == 0 or grad_acc == 0:
            raise key_error(
                keys, f"train_batch_size ({train_batch}) is not a multiple of the micro-batch * accumulation * data-parallel size ({dp})"
            )
        return train_batch, micro_batch, grad_acc
    micro_batch = micro_batch or 1
    grad_acc = grad_acc or 1
    return micro_batch * grad_acc * dp, micro_batch, grad_acc


def pad_vocab_size(vocab_size: int, divisible_by: int, model_parallel_size: int) -> int:
    """NeoX's padded vocabulary: the next multiple of divisible_by * mp."""
    if model_parallel_size < 1:  # derived before the validation rules run
        raise key_error("model_parallel_size", f"expected an integer >= 1, got {model_parallel_size}")
    multiple = max(divisible_by, 1) * model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def expand_attention_config(config: Any, num_layers: int) -> list[str]:
    """NeoX pairs [[types, count], ...] -> one attention type per layer (types repeat cyclically).

    As NeoX's ``expand_attention_types``, the count ``"all"`` repeats the pattern over every layer
    (``[[["global"], "all"]]``); NeoX then ignores any other pair, so here it must be the only one.
    """
    if not config:
        return ["global"] * num_layers
    if not isinstance(config, (list, tuple)):
        raise key_error("attention_config", f"expected [[types, count], ...] pairs, got {config!r}")
    if all(isinstance(item, str) for item in config):
        layers = list(config)
    else:
        layers = []
        for item in config:
            count = item[1] if isinstance(item, (list, tuple)) and len(item) == 2 else None
            if not (isinstance(count, int) or count == "all"):
                raise key_error("attention_config", f"expected [[types, count], ...] pairs (count an integer or "
                                f"'all'), got {item!r}")
            types = [item[0]] if isinstance(item[0], str) else list(item[0])
            if count == "all":
                if len(config) != 1 or not types or num_layers % len(types):
                    raise key_error("attention_config", f"a count of 'all' needs one pair whose pattern length divides "
                                    f"num_layers ({num_layers}), got {config!r}")
                count = num_layers // len(types)
            for _ in range(count):
                layers.extend(types)
    if len(layers) != num_layers:
        raise key_error("attention_config", f"describes {len(layers)} layers but num_layers is {num_layers}")
    return layers


class MlpShape(NamedTuple):
    mlp_type: str  # "llama" (gated) or "regular"
    activation: str  # gelu, relu or silu: the function applied (to the gate when gated)
    intermediate_size: int  # per branch of a gated MLP

    @property
    def gated(self) -> bool:
        return self.mlp_type == "llama"


def num_kv_heads(cfg: Any) -> int:
    """Key/value heads of a ModelConfig (one for multiquery; num_attention_heads when unset: a ModelConfig
    built directly is not derived)."""
    if cfg.attention_type == "multiquery":
        return 1
    return cfg.num_kv_heads or cfg.num_attention_heads


def mlp_shape(cfg: Any) -> MlpShape:
    """The MLP's kind, activation and inner size, as GPT-NeoX sizes its MLPs; ``cfg`` is a ModelConfig
    (derived or built directly) or the flat values. The one rule: derivation and the model both call it.

    - ``mlp_type: llama`` (older NeoX's LLaMAParallelMLP): gated; size = intermediate_size, else 8h/3
      rounded up to 256, per branch.
    - ``activation: swiglu|geglu|reglu`` (current NeoX's ParallelMLP): gated; intermediate_size (default 4h,
      or expansion_factor * h) counts both branches before NeoX's 2/3 scaling: per branch =
      round_up(int(size * 2/3) // 2, mlp_multiple_of).
    - otherwise a plain MLP of intermediate_size (default 4h, or expansion_factor * h) rounded up to
      mlp_multiple_of.

    Idempotent: a derived config (llama, its per-branch size) gives the same shape again.
    """
    get = cfg.get if isinstance(cfg, Mapping) else lambda k: getattr(cfg, k)
    h, size = get("hidden_size"), get("intermediate_size")
    act = "silu" if get("activation") == "swish" else get("activation")
    mlp_type = get("mlp_type")
    multiple = max(get("mlp_multiple_of") or 1, 1)
    base = size or (int(get("expansion_factor") * h) if get("expansion_factor") else 4 * h)
    if mlp_type == "llama":
        if size is None:
            size = 256 * math.ceil(int(2 * h * 4 / 3) / 256)
        return MlpShape("llama", GATED_ACTIVATIONS.get(act, act), size)
    if act in GATED_ACTIVATIONS:
        per_branch = int(base * 2 / 3) // 2
        return MlpShape("llama", GATED_ACTIVATIONS[act], multiple * math.ceil(per_branch / multiple))
    return MlpShape(mlp_type, act, multiple * math.ceil(base / multiple))


def mlp_has_bias(cfg: Any) -> bool:
    """NeoX's LLaMA MLP has no biases whatever use_bias_in_mlp says (neox sizes every gated MLP as it)."""
    return bool(cfg.use_bias_in_mlp) and not mlp_shape(cfg).gated


def derive_model(v: dict[str, Any], vocab_size: int | None) -> None:
    if not v["num_layers"] or not v["hidden_size"] or not v["num_attention_heads"]:
        missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if not v[k]]
        raise key_error(missing[0], "must be set to a positive integer (no default)")
    heads = v["num_attention_heads"]
    if v["attention_type"] == "multiquery":
        v["num_kv_heads"] = 1
    if v["num_kv_heads"] is None:
        if v["attention_type"] == "groupedquery":
            raise key_error(("attention_type", "num_kv_heads"), "groupedquery attention needs num_kv_heads")
        v["num_kv_heads"] = heads
    if v["num_kv_heads"] < heads and v["attention_type"] == "multihead":
        v["attention_type"] = "multiquery" if v["num_kv_heads"] == 1 else "groupedquery"
    if v["seq_length"] is None:
        v["seq_length"] = v["max_position_embeddings"]
    if v["max_position_embeddings"] is None:
        v["max_position_embeddings"] = v["seq_length"]
    v["attention_config"] = expand_attention_config(v["attention_config"], v["num_layers"])
    v["mlp_type"], v["activation"], v["intermediate_size"] = mlp_shape(v)
    if v["padded_vocab_size"] is None and vocab_size is not None:
        v["padded_vocab_size"] = pad_vocab_size(vocab_size, v["make_vocab_size_divisible_by"], v["model_parallel_size"])


def derive_batch(v: dict[str, Any], world_size: int) -> None:
    v["world_size"] = world_size
    dp = data_parallel_size(world_size, v["model_parallel_size"], v["pipe_parallel_size"])
    v["data_parallel_size"] = dp
    v["train_batch_size"], v["train_micro_batch_size_per_gpu"], v["gradient_accumulation_steps"] = batch_triple(
        v["train_batch_size"], v["train_micro_batch_size_per_gpu"], v["gradient_accumulation_steps"], dp
    )


class LRSchedule(NamedTuple):
    """The learning-rate schedule's numbers, as GPT-NeoX's get_learning_rate_scheduler computes them."""

    lr: float | None
    min_lr: float
    warmup_iters: float | None  # a float, as NeoX keeps warmup * decay iterations
    decay_iters: int | None  # None only without train_iters (a model-only config)
    style: str


def lr_schedule(cfg: Any, train_iters: int | None, lr: float | None) -> LRSchedule:
    """The one rule for the schedule; ``cfg`` is an LRConfig (derived or not) or the flat values.

    decay: lr_decay_iters, else floor(train_iters * lr_decay_fraction), else train_iters; at least 1.
    warmup: warmup_iters, else warmup * decay. min_lr: decay_lr_to * lr when decay_lr_to is set.
    Idempotent: the derived values give themselves again.
    """
    get = cfg.get if isinstance(cfg, Mapping) else lambda k: getattr(cfg, k)
    decay, fraction = get("lr_decay_iters"), get("lr_decay_fraction")
    if decay is None and train_iters:
        decay = math.floor(train_iters * fraction) if fraction is not None else train_iters
    if decay is not None:
        decay = max(1, int(decay))
    warmup = get("warmup_iters")
    if warmup is None and decay is not None:
        warmup = get("warmup") * decay
    if warmup is not None and decay is not None and not 0 <= warmup <= decay:
        raise key_error("warmup_iters", f"expected a value in [0, lr_decay_iters={decay}], got {warmup}")
    min_lr = get("min_lr") or 0.0
    if get("decay_lr_to") is not None and lr is not None:
        min_lr = get("decay_lr_to") * lr
    return LRSchedule(lr, min_lr, None if warmup is None else float(warmup), decay, get("lr_decay_style"))


def derive_lr(v: dict[str, Any]) -> None:
    params = (v["optimizer"] or {}).get("params") or {}
    if v["lr"] is None and "lr" in params:
        v["lr"] = float(params["lr"])
    fraction, train_iters = v["lr_decay_fraction"], v["train_iters"]
    if fraction is not None and train_iters and v["lr_decay_iters"] not in (None, math.floor(train_iters * fraction)):
        raise key_error(("lr_decay_iters", "lr_decay_fraction"), f"lr_decay_iters {v['lr_decay_iters']} disagrees "
                        f"with lr_decay_fraction * train_iters = {math.floor(train_iters * fraction)}; set one")
    if v["decay_lr_to"] is not None and v["lr"] is not None:
        target = v["decay_lr_to"] * v["lr"]
        if v["min_lr"] and not math.isclose(v["min_lr"], target, rel_tol=1e-6):
            raise key_error(("min_lr", "decay_lr_to"), f"min_lr {v['min_lr']} disagrees with decay_lr_to * lr = {target}")
    s = lr_schedule(v, train_iters, v["lr"])
    v["lr_decay_iters"], v["warmup_iters"], v["min_lr"] = s.decay_iters, s.warmup_iters, s.min_lr


def derive_precision(v: dict[str, Any], notes: list[str]) -> None:
    fp16, bf16 = dict(v["fp16"] or {}), dict(v["bf16"] or {})
    precision = PRECISION_ALIASES.get(v["precision"], v["precision"])
    if precision is None:
        precision = "fp16" if fp16.get("enabled") else "bfloat16" if bf16.get("enabled") else "fp32"
    if precision == "fp16" and "enabled" not in fp16:
        fp16["enabled"] = True
    if precision == "bfloat16" and "enabled" not in bf16:
        bf16["enabled"] = True
    v["precision"], v["fp16"], v["bf16"] = precision, fp16, bf16
    zero = dict(v["zero_optimization"] or {})
    accum = str((v["data_types"] or {}).get("grad_accum_dtype", "")).lower()
    if (precision == "bfloat16" and accum in ("fp32", "float32", "float") and int(zero.get("stage", 0)) == 0
            and not _takes_master_weights(v, precision, zero)):
        zero["stage"] = 1
        notes.append(
            "zero_optimization.stage 0 -> 1: DeepSpeed refuses bf16 with grad_accum_dtype fp32 at stage 0"
        )
    v["zero_optimization"] = zero


def _takes_master_weights(v: dict[str, Any], precision: str, zero: dict[str, Any]) -> bool:
    """neox's master-weight optimizer accumulates in fp32 itself, so stage 0 stays (fast_path)."""
    from neox.config.fast_path import master_weights_for

    return master_weights_for(
        setting=v.get("optimizer_master_weights"), precision=precision, zero=zero, dp=v.get("data_parallel_size") or 1,
        pp=v.get("pipe_parallel_size") or 0, optimizer_type=str((v.get("optimizer") or {}).get("type", "AdamW")),
        fp32_residual=bool(v.get("fp32_residual_connection"))).enabled


def derive_all(
    values: dict[str, Any], world_size: int, vocab_size: int | None = None
) -> tuple[dict[str, Any], list[str]]:
    """All derived values; returns (new flat values, notes for the user)."""
    v = dict(values)
    notes: list[str] = []
    steps: list[Callable[[], None]] = [
        lambda: derive_model(v, vocab_size),
        lambda: derive_batch(v, world_size),
        lambda: derive_lr(v),
        lambda: derive_precision(v, notes),
    ]
    for step in steps:
        step()
    return v, notes
