"""The DeepSpeed config: contents written out by hand, and DeepSpeed 0.19's own parser accepts it."""

from __future__ import annotations

import pytest

from neox.config import NeoXArgs

LLEMMA_LIKE = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
    "model_parallel_size": 2,
    "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8}},
    "zero_optimization": {"stage": 1, "allgather_bucket_size": 1260000000, "cpu_offload": False},
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
    "precision": "bfloat16", "bf16": {"enabled": True}, "fp32_allreduce": True,
    "data_types": {"grad_accum_dtype": "fp32"}, "gradient_clipping": 1.0, "weight_decay": 0.1,
    "wall_clock_breakdown": True, "steps_per_print": 1,
}


def test_deepspeed_config_contents():
    cfg = NeoXArgs.from_flat(LLEMMA_LIKE, world_size=8).deepspeed_config()
    expected = {
        "train_batch_size": 4 * 2 * 4,  # micro x accumulation x dp (8 ranks / mp 2)
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1, "allgather_bucket_size": 1260000000},
        "fp16": {"enabled": False},
        "bf16": {"enabled": True},
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "wall_clock_breakdown": True,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": False,
        "timers": {"throughput": {"enabled": False}},
    }  # no optimizer or scheduler block: neox hands DeepSpeed the optimizer and LR schedule it built
    assert cfg == expected


@pytest.mark.parametrize("key", ["optimizer", "scheduler"])
def test_extra_args_cannot_ask_deepspeed_to_build_the_optimizer(key):
    from neox.errors import ConfigError

    args = NeoXArgs.from_flat({**LLEMMA_LIKE, "deepspeed_extra_args": {key: {"type": "Adam"}}}, world_size=8)
    with pytest.raises(ConfigError, match=f"^deepspeed_extra_args.{key}: neox builds the {key} itself") as err:
        args.deepspeed_config()
    assert "\n" not in str(err.value)


def test_legacy_fp16_block_and_passthrough():
    values = {**LLEMMA_LIKE, "precision": None, "bf16": {}, "data_types": {}, "model_parallel_size": 1,
              "fp16": {"fp16": True, "enabled": True, "loss_scale": 0, "initial_scale_power": 12},
              "deepspeed_extra_args": {"memory_breakdown": True, "timers": {"throughput": {"enabled": True}}},
              "prescale_gradients": False}
    cfg = NeoXArgs.from_flat(values, world_size=1).deepspeed_config()
    assert cfg["timers"] == {"throughput": {"enabled": True}}  # the user's choice wins over neox's default
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}
    assert cfg["memory_breakdown"] is True and cfg["prescale_gradients"] is False


@pytest.mark.parametrize("overrides", [{}, {"precision": None, "bf16": {}, "data_types": {},
                                            "fp16": {"fp16": True, "enabled": True, "loss_scale": 0}}])
def test_deepspeed_parses_it(overrides, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed's bf16 optimizer (at data parallel 1 neox would choose its own: test_fast_default.py)
    values = {**LLEMMA_LIKE, "model_parallel_size": 1, "optimizer_master_weights": False, **overrides}
    ds = DeepSpeedConfig(NeoXArgs.from_flat(values, world_size=1).deepspeed_config())
    assert ds.train_batch_size == 8 and ds.gradient_accumulation_steps == 2
    assert ds.zero_optimization_stage == 1
    assert ds.bfloat16_config.enabled == (not overrides)
    assert ds.float16_config.enabled == bool(overrides)
