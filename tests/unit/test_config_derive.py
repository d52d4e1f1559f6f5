"""Derived values, checked against NeoX's formulas written out by hand."""

from __future__ import annotations

import math

import pytest

from neox.config import NeoXArgs
from neox.config.derive import batch_triple, expand_attention_config, pad_vocab_size
from neox.errors import ConfigError

BASE = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 8, "seq_length": 32}


def resolve(world_size=1, **overrides):
    return NeoXArgs.from_flat({**BASE, **overrides}, world_size=world_size)


@pytest.mark.parametrize("world,mp,pp,dp", [(1, 1, 0, 1), (8, 2, 0, 4), (8, 2, 2, 2), (16, 4, 1, 4), (96, 2, 4, 12)])
def test_data_parallel_size_and_batch_for_several_world_sizes(world, mp, pp, dp):
    args = resolve(world, model_parallel_size=mp, pipe_parallel_size=pp, train_micro_batch_size_per_gpu=4,
                   gradient_accumulation_steps=8)
    assert args.parallel.world_size == world and args.parallel.data_parallel_size == dp
    assert args.training.train_batch_size == 4 * 8 * dp


def test_any_two_determine_the_third():
    dp = 4
    assert batch_triple(None, 4, 8, dp) == (128, 4, 8)
    assert batch_triple(128, 4, None, dp) == (128, 4, 8)
    assert batch_triple(128, None, 8, dp) == (128, 4, 8)
    assert batch_triple(128, 4, 8, dp) == (128, 4, 8)
    assert batch_triple(128, None, None, dp) == (128, 32, 1)  # NeoX: global only -> accumulation 1
    assert batch_triple(None, 4, None, dp) == (16, 4, 1)
    with pytest.raises(ConfigError, match="train_batch_size"):
        batch_triple(100, 4, 8, dp)
    with pytest.raises(ConfigError, match="not a multiple"):
        batch_triple(100, 3, None, dp)


def test_world_not_divisible_by_model_ranks():
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        resolve(6, model_parallel_size=4)


def test_padded_vocab():
    assert pad_vocab_size(50257, 128, 1) == 50304
    assert pad_vocab_size(50257, 128, 2) == 50432  # next multiple of 256
    assert pad_vocab_size(32000, 1, 8) == 32000
    assert resolve(2, model_parallel_size=2, padded_vocab_size=None, tokenizer_type="CharLevelTokenizer").model.padded_vocab_size == 512
    args = resolve(1).with_vocab_size(50257)
    assert args.model.padded_vocab_size == 50304


def test_attention_config_expansion():
    assert expand_attention_config([[["global"], 3]], 3) == ["global"] * 3
    assert expand_attention_config([[["global", "flash"], 2]], 4) == ["global", "flash", "global", "flash"]
    assert expand_attention_config(None, 2) == ["global", "global"]
    assert expand_attention_config(["flash", "flash"], 2) == ["flash", "flash"]  # already expanded
    with pytest.raises(ConfigError, match="expected \\[\\[types, count\\], ...\\] pairs, got 'flash'"):
        resolve(attention_config="flash")
    with pytest.raises(ConfigError, match="describes 3 layers but num_layers is 4"):
        resolve(attention_config=[[["flash"], 3]])


def test_mlp_sizes_as_neox():
    # regular: 4h;  mlp_type llama (older NeoX): 8h/3 rounded up to 256 per branch
    assert resolve().model.intermediate_size == 256
    big = dict(hidden_size=4096, num_attention_heads=32)
    assert resolve(mlp_type="llama", activation="silu", **big).model.intermediate_size == 11008
    # current NeoX: swiglu, intermediate_size counts both branches before the 2/3 scaling
    args = resolve(activation="swiglu", intermediate_size=32768, mlp_multiple_of=256, **big)
    per_branch = 256 * math.ceil((int(32768 * 2 / 3) // 2) / 256)
    assert (args.model.mlp_type, args.model.activation, args.model.intermediate_size) == ("llama", "silu", per_branch) == ("llama", "silu", 11008)
    assert resolve(mlp_type="llama", activation="silu", intermediate_size=14336, **big).model.intermediate_size == 14336
    assert resolve(activation="swish").model.activation == "silu"


def test_kv_heads_and_positions():
    args = resolve()
    assert args.model.num_kv_heads == 8 and args.model.max_position_embeddings == 32
    assert resolve(num_kv_heads=2).model.attention_type == "groupedquery"
    assert resolve(attention_type="multiquery").model.num_kv_heads == 1
    with pytest.raises(ConfigError, match="groupedquery attention needs num_kv_heads"):
        resolve(attention_type="groupedquery")


def test_lr_schedule_values():
    args = resolve(optimizer={"type": "Adam", "params": {"lr": 1e-4}}, train_iters=1000, decay_lr_to=0.033)
    assert args.lr.lr == 1e-4 and args.lr.lr_decay_iters == 1000
    assert args.lr.warmup_iters == 10  # NeoX: warmup fraction of lr_decay_iters
    assert args.lr.min_lr == pytest.approx(3.3e-6)
    assert resolve(train_iters=1000, lr_decay_fraction=0.5).lr.lr_decay_iters == 500


def test_precision_and_zero_stage_mapping(capsys):
    # on DeepSpeed's bf16 optimizer (neox's own, chosen at data parallel 1, keeps stage 0: test_fast_default.py)
    args = resolve(precision="bfloat16", data_types={"grad_accum_dtype": "fp32"}, optimizer_master_weights=False)
    assert args.precision.bf16 == {"enabled": True} and args.optim.zero_optimization["stage"] == 1
    assert "zero_optimization.stage 0 -> 1" in capsys.readouterr().err
    assert resolve(fp16={"enabled": True}).precision.precision == "fp16"
    assert resolve().precision.precision == "fp32"


def test_flat_round_trip_is_identity():
    args = resolve(2, model_parallel_size=2, activation="swiglu", mlp_multiple_of=8, train_batch_size=8, bias_gelu_fusion=True,
                   attention_config=[[["flash"], 4]], tokenizer_type="CharLevelTokenizer")
    again = NeoXArgs.from_flat(args.to_flat(), world_size=2)
    assert again == args
    import json

    json.dumps(args.to_flat())  # JSON-able
