"""Derived values computed by one rule: a ModelConfig built directly and the YAML route give the same
model; the LR schedule's numbers and the padded vocabulary match hand-computed GPT-NeoX values."""

from __future__ import annotations

import math

import pytest

from neox.config import LRConfig, ModelConfig, NeoXArgs
from neox.config.derive import pad_vocab_size
from neox.model import GPTModel
from neox.training.lr_schedule import lr_at, resolve_schedule


def upstream_mlp_dims(h: int, intermediate_size: int | None, expansion_factor: float | None, gated: bool,
                      multiple_of: int) -> tuple[int, int]:
    """(linear1 output, linear2 input) as GPT-NeoX's ParallelMLP.__init__ writes them (transformer.py)."""
    if intermediate_size:
        ffn_dim = intermediate_size
    elif expansion_factor:
        ffn_dim = int(expansion_factor * h)
    else:
        ffn_dim = 4 * h
    ffn_dim_in = ffn_dim
    if gated:
        ffn_dim = int(ffn_dim * 2 / 3)
        ffn_dim_in = ffn_dim // 2
    ffn_dim = int((2 * multiple_of) * ((ffn_dim + (2 * multiple_of) - 1) // (2 * multiple_of)))
    ffn_dim_in = int(multiple_of * ((ffn_dim_in + multiple_of - 1) // multiple_of))
    return ffn_dim, ffn_dim_in


SHAPES = [  # (model keys, gated) as a GPT-NeoX config writes them
    (dict(hidden_size=64, activation="swiglu"), True),
    (dict(hidden_size=64, activation="swiglu", intermediate_size=256, mlp_multiple_of=8), True),
    (dict(hidden_size=128, activation="geglu", mlp_multiple_of=64), True),
    (dict(hidden_size=96, activation="reglu", expansion_factor=3.0), True),
    (dict(hidden_size=64, activation="gelu"), False),
    (dict(hidden_size=64, activation="relu", expansion_factor=2.5), False),
]


def _flat(keys: dict) -> dict:
    return {"num_layers": 2, "num_attention_heads": 4, "seq_length": 16, "max_position_embeddings": 16,
            "padded_vocab_size": 128, **keys}


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    model = GPTModel(cfg, device="meta")
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("keys,gated", SHAPES, ids=[str(s[0]) for s in SHAPES])
def test_direct_model_config_equals_yaml_route(keys, gated):
    direct = ModelConfig(**_flat(keys))
    derived = NeoXArgs.from_flat(_flat(keys), world_size=1).model
    shapes = _param_shapes(direct)
    assert shapes == _param_shapes(derived)
    up_out, up_in = upstream_mlp_dims(keys["hidden_size"], keys.get("intermediate_size"), keys.get("expansion_factor"),
                                      gated, keys.get("mlp_multiple_of", 1))
    assert shapes["layers.0.mlp.linear2.weight"][1] == up_in == derived.intermediate_size
    if gated:  # linear1 is [gate; up], each of linear2's input size
        assert shapes["layers.0.mlp.linear1.weight"][0] == 2 * up_in
    else:
        assert shapes["layers.0.mlp.linear1.weight"][0] == up_out


def test_swiglu_hidden_64_is_85_per_branch_and_llama_7b_is_11008():
    assert NeoXArgs.from_flat(_flat(dict(hidden_size=64, activation="swiglu")), world_size=1).model.intermediate_size == 85
    assert _param_shapes(ModelConfig(**_flat(dict(hidden_size=64, activation="swiglu"))))[
        "layers.0.mlp.linear2.weight"] == (64, 85)
    llama = dict(hidden_size=4096, num_attention_heads=32, activation="swiglu", intermediate_size=32768, mlp_multiple_of=256)
    assert NeoXArgs.from_flat(_flat(llama), world_size=1).model.intermediate_size == 11008


def test_lr_schedule_numbers_against_hand_computed_neox_values():
    flat = _flat(dict(hidden_size=64)) | dict(
        train_iters=150, lr_decay_fraction=0.8, warmup=0.01, lr_decay_style="cosine", decay_lr_to=0.1,
        optimizer={"type": "Adam", "params": {"lr": 1e-3}})
    lr_cfg = NeoXArgs.from_flat(flat, world_size=1).lr
    # GPT-NeoX: num_iters = floor(150 * 0.8) = 120, warmup_iter = 0.01 * 120 = 1.2 (a float), min_lr = 0.1 * lr
    assert lr_cfg.lr_decay_iters == 120 and lr_cfg.warmup_iters == pytest.approx(1.2)
    assert lr_cfg.min_lr == pytest.approx(1e-4)
    raw = LRConfig(lr_decay_fraction=0.8, warmup=0.01, lr_decay_style="cosine", decay_lr_to=0.1)
    derived_sched = resolve_schedule(lr_cfg, 150, 1e-3)
    assert derived_sched == pytest.approx(resolve_schedule(raw, 150, 1e-3))
    hand = {1: 1e-3 / 1.2}
    for it in (2, 60, 120, 200):
        n = min(it, 120) - 1.2
        hand[it] = 1e-4 + (1e-3 - 1e-4) / 2 * (1 + math.cos(math.pi * n / (120 - 1.2)))
    for it, want in hand.items():
        assert lr_at(it, **derived_sched) == pytest.approx(want, rel=1e-12), it


def test_lr_decay_iters_and_fraction_must_agree():
    from neox.errors import ConfigError

    base = _flat(dict(hidden_size=64)) | dict(train_iters=100, lr_decay_fraction=0.5)
    assert NeoXArgs.from_flat(base | dict(lr_decay_iters=50), world_size=1).lr.lr_decay_iters == 50
    with pytest.raises(ConfigError, match="lr_decay_iters 70 disagrees with lr_decay_fraction"):
        NeoXArgs.from_flat(base | dict(lr_decay_iters=70), world_size=1)


def test_padded_vocab_one_rule():
    # GPT-NeoX: pad 50257 to a multiple of make_vocab_size_divisible_by * model_parallel_size
    assert pad_vocab_size(50257, 128, 1) == 50304 and pad_vocab_size(50257, 128, 2) == 50432
    flat = {k: v for k, v in _flat(dict(hidden_size=64)).items() if k != "padded_vocab_size"}
    args = NeoXArgs.from_flat(flat | dict(model_parallel_size=2), world_size=2, vocab_size=50257)
    assert args.model.padded_vocab_size == 50432
    assert NeoXArgs.from_flat(flat | dict(model_parallel_size=2), world_size=2).with_vocab_size(
        50257).model.padded_vocab_size == 50432
