"""Every GPT-NeoX argument field is a known key (issue 18, items 11 and 12).

The field list is tests/fixtures/upstream_neox/neox_args_defaults.yml, generated from GPT-NeoX's own
neox_args.py / deepspeed_args.py (its header names the commit). Each field resolves at GPT-NeoX's
default; the switches neox lacks are one-line errors when turned on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from neox.config import LoggingConfig, NeoXArgs, compat, keys
from neox.errors import ConfigError
from neox.metrics import MetricsLogger
from neox.training import flops

UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "upstream_neox" / "neox_args_defaults.yml"
SHAPE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "padded_vocab_size": 128}
# a key whose GPT-NeoX default leaves the model undefined gets the shape above instead
NO_DEFAULT = set(SHAPE) | {"max_position_embeddings"}


def upstream_defaults() -> dict:
    return yaml.safe_load(UPSTREAM.read_text())


def test_fixture_holds_the_whole_upstream_list():
    defaults = upstream_defaults()
    assert len(defaults) > 300
    for key in ("te_fp8_format", "wandb_run_name", "peak_theoretical_tflops", "moe_router_type", "kl_impl",
                "online_dataserver_ports", "fused_kernels_build_path", "use_bnb_optimizer", "hostfile"):
        assert key in defaults


def test_every_upstream_field_is_a_known_key():
    unknown = [k for k in upstream_defaults() if keys.canonical(k) not in keys.known_keys()]
    assert unknown == []


def test_every_upstream_field_resolves_at_its_default():
    defaults = {k: v for k, v in upstream_defaults().items() if keys.canonical(k) not in NO_DEFAULT}
    # GPT-NeoX lists two legacy aliases beside their keys; one file cannot set both spellings
    aliases = {k: defaults.pop(k) for k in list(defaults) if keys.canonical(k) != k and keys.canonical(k) in defaults}
    args = NeoXArgs.from_flat({**defaults, **SHAPE}, world_size=1)
    assert args.logging.wandb_run_name is None and args.precision.te_fp8_format == "hybrid" and args.precision.fp8_recipe is None
    assert args.training.gradient_accumulation_steps == 1 and args.precision.precision == "fp32"
    NeoXArgs.from_flat({**aliases, **SHAPE}, world_size=1)


@pytest.mark.parametrize("key,value", [
    ("moe_router_type", "topk"), ("kl_impl", "full"),
    ("serve_model_weights", True), ("online_dataserver_ips", "10.0.0.1"),
    ("use_bnb_optimizer", True), ("use_comet", True), ("memory_profiling", True), ("scheduler", {"type": "x"}),
    ("checkpoint_in_cpu", True), ("log_gradient_noise_scale", True), ("use_shared_fs", False),
])
def test_a_switch_neox_lacks_is_a_one_line_error_naming_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_flat({**SHAPE, key: value}, world_size=1)
    msg = str(err.value)
    assert "\n" not in msg and msg.split(": ")[1] == key and "not supported" in msg


def test_transformer_engine_keys_are_typed_fp8_fields_with_upstream_defaults():
    """The ten te_* keys drive neox's FP8 (neox.model.fp8): typed PrecisionConfig fields whose defaults are
    upstream's, so an upstream config that leaves them alone resolves to bf16."""
    from neox.config.optim import PrecisionConfig

    te = {k: v for k, v in upstream_defaults().items() if k.startswith("te_")}
    assert len(te) == 10
    fields = PrecisionConfig.__dataclass_fields__
    assert all(fields[k].default == v for k, v in te.items())
    assert not set(te) & (set(compat.UNSUPPORTED) | set(compat.NO_EFFECT))


def test_no_effect_keys_are_not_switches():
    """A NO_EFFECT key must not be a feature a user turns on (those are UNSUPPORTED): its reason says why
    nothing would change. The ones the issue named are errors now."""
    for key in ("use_bnb_optimizer", "use_comet", "memory_profiling", "te_mha", "wandb_run_name"):
        assert key not in compat.NO_EFFECT
    assert not set(compat.NO_EFFECT) & set(compat.UNSUPPORTED)


def test_peak_theoretical_tflops_is_the_mfu_denominator(monkeypatch):
    monkeypatch.setenv(flops.PEAK_ENV, "50")
    args = NeoXArgs.from_flat({**SHAPE, "peak_theoretical_tflops": 312.0}, world_size=1)
    peak = flops.peak_tflops("NVIDIA H100 80GB HBM3", args.logging.peak_theoretical_tflops)
    assert peak == 312.0
    out = flops.throughput(args.model, 1000, 1.0, 1, peak)
    assert out["mfu"] == pytest.approx(flops.flops_per_token(args.model) * 1000 / 1e12 / 312.0)
    with pytest.raises(ConfigError, match="peak_theoretical_tflops"):
        NeoXArgs.from_flat({**SHAPE, "peak_theoretical_tflops": 0}, world_size=1)


def test_wandb_run_name_names_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = NeoXArgs.from_flat({**SHAPE, "use_wandb": True, "wandb_run_name": "pythia-160m-ablation",
                               "log_dir": str(tmp_path)}, world_size=1)
    logger = MetricsLogger(args.logging, train_iters=1, run_config={})
    try:
        assert logger.wandb is not None and logger.wandb.name == "pythia-160m-ablation"
    finally:
        logger.close()


def test_use_wandb_null_logs_when_a_key_is_found(tmp_path, monkeypatch):
    """GPT-NeoX's default use_wandb is null: on when a W&B key is found."""
    from neox.metrics import wants_wandb

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wants_wandb(LoggingConfig(use_wandb=None)) is False
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wants_wandb(LoggingConfig(use_wandb=None)) is True
    assert wants_wandb(LoggingConfig(use_wandb=False)) is False
