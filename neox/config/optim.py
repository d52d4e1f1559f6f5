"""OptimizerConfig, LRConfig and PrecisionConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer arguments (the dicts pass through to DeepSpeed)."""

    optimizer: dict[str, Any] = field(default_factory=dict)
    """Optimizer as NeoX writes it: {type: Adam|AdamW|..., params: {lr, betas, eps, ...}}."""

    weight_decay: float = 0.1
    """Weight decay coefficient (not applied to biases and norm weights)."""

    gradient_clipping: float = 1.0
    """Clip gradients to this global L2 norm (0: no clipping)."""

    zero_optimization: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed ZeRO settings ({stage, allgather_bucket_size, reduce_bucket_size, overlap_comm, offload_optimizer, ...}); passed through."""

    zero_allow_untested_optimizer: bool = False
    """Let DeepSpeed ZeRO wrap an optimizer it has not tested (passed through)."""


@dataclass(frozen=True)
class LRConfig:
    """Learning-rate schedule arguments."""

    lr: float | None = None
    """Peak learning rate. None: optimizer.params.lr."""

    lr_decay_style: Literal["constant", "linear", "cosine", "exponential"] = "linear"
    """Decay after warmup: 'constant', 'linear', 'cosine' or 'exponential'."""

    lr_decay_iters: int | None = None
    """Iterations over which the learning rate decays. None: train_iters."""

    lr_decay_fraction: float | None = None
    """If set, lr_decay_iters = lr_decay_fraction * train_iters."""

    warmup: float = 0.01
    """Warmup as a fraction of lr_decay_iters (NeoX's meaning); ignored when warmup_iters is set."""

    warmup_iters: int | None = None
    """Warmup iterations. None: round(warmup * lr_decay_iters)."""

    min_lr: float = 0.0
    """Floor of the learning rate after decay."""

    decay_lr_to: float | None = None
    """Decay to this fraction of lr (e.g. 0.033). Overrides min_lr when set: min_lr = decay_lr_to * lr."""

    override_lr_scheduler: bool = False
    """On load, take the schedule from the config rather than the checkpoint."""

    use_checkpoint_lr_scheduler: bool = False
    """On load, take the schedule from the checkpoint rather than the config."""


@dataclass(frozen=True)
class PrecisionConfig:
    """Mixed-precision arguments (fp16 / bf16 dicts pass through to DeepSpeed)."""

    precision: Literal["fp32", "fp16", "bfloat16"] | None = None
    """Training precision. None: derived from fp16.enabled / bf16.enabled, else fp32."""

    fp16: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed fp16 block ({enabled, loss_scale, loss_scale_window, hysteresis, min_loss_scale, initial_scale_power})."""

    bf16: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed bf16 block ({enabled})."""

    fp32_allreduce: bool = False
    """All-reduce gradients in fp32."""

    data_types: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed data_types block, e.g. {grad_accum_dtype: fp32}."""

    communication_data_type: str | None = None
    """DeepSpeed communication_data_type (passed through)."""

    fp16_lm_cross_entropy: bool = False
    """Compute the LM cross entropy in half precision."""

    optimizer_master_weights: bool = False
    """neox: with precision fp32 and torch_autocast in bf16 (ZeRO stage 0, no pipeline engine, Adam), the model holds bf16 parameters and the optimizer their fp32 master weights, updated and written back in one compiled pass: no per-step weight casts or fp32 gradient copies (measured on an H100: docs/performance.md). Gradients are bf16, so gradient_accumulation_steps > 1 also needs data_types.grad_accum_dtype bf16."""
