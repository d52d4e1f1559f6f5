"""OptimizerConfig, LRConfig and PrecisionConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer arguments (the dicts pass through to DeepSpeed)."""

    optimizer: dict[str, Any] = field(default_factory=dict)
    """Optimizer as NeoX writes it: {type, params: {lr, betas, eps, ...}}. type Adam, AdamW or FusedAdam: AdamW (torch's, or DeepSpeed's prebuilt FusedAdam / CPU Adam); cpu_adam: DeepSpeed's CPU Adam with ZeRO CPU offload or on CPU ranks (compiled on first use: needs a C++ compiler and ninja); SGD."""

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
    """Iterations over which the learning rate decays (at least 1). None: floor(lr_decay_fraction * train_iters) if that is set, else train_iters."""

    lr_decay_fraction: float | None = None
    """If set, lr_decay_iters = floor(lr_decay_fraction * train_iters) (set one of the two)."""

    warmup: float = 0.01
    """Warmup as a fraction of lr_decay_iters (NeoX's meaning); ignored when warmup_iters is set."""

    warmup_iters: float | None = None
    """Warmup iterations. None: warmup * lr_decay_iters, kept as a float as GPT-NeoX does (0.01 * 150 = 1.5)."""

    min_lr: float = 0.0
    """Floor of the learning rate after decay."""

    decay_lr_to: float | None = None
    """Decay to this fraction of lr (e.g. 0.033). Overrides min_lr when set: min_lr = decay_lr_to * lr."""

    override_lr_scheduler: bool = False
    """On load, use the config's schedule (lr, min_lr, warmup, decay iterations, style) instead of the checkpoint's; the position (iteration) still comes from the checkpoint. Without this or use_checkpoint_lr_scheduler the two must agree (as GPT-NeoX asserts), else a one-line CheckpointError names what differs."""

    use_checkpoint_lr_scheduler: bool = False
    """On load, use the checkpoint's schedule instead of the config's (see override_lr_scheduler; set at most one)."""


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


    optimizer_master_weights: bool | None = None
    """neox: the model holds bf16 parameters and neox's optimizer their fp32 master weights and Adam moments, updated and written back in one compiled pass: no per-step weight casts or fp32 gradient copies (measured faster on an H100/H200: docs/performance.md). None (unset): on for precision bfloat16 without a pipeline engine at ZeRO stage 0, or stage 1 with one data-parallel rank (instead of DeepSpeed's bf16 optimizer), else off; the run's first log lines say which. true: also with precision fp32 + torch_autocast bf16; needs ZeRO stage 0 (or 1 at data parallel 1), pipe_parallel_size 0 and Adam/AdamW. With gradient_accumulation_steps > 1 the micro-batches' bf16 gradients are summed in fp32 buffers (data_types.grad_accum_dtype bf16: in the bf16 gradients instead). false: DeepSpeed's bf16 optimizer / fp32 parameters."""

    fp8_recipe: Literal["tensorwise", "rowwise"] | None = None
    """neox: train the transformer-block linears (attention query_key_value and dense, MLP linear1 and linear2; not the embedding or the output layer) in FP8 with torchao's float8 training: 'tensorwise' (one dynamic scale per tensor, e4m3 forward, e5m2 gradients) or 'rowwise' (dynamic scales per row, e4m3 throughout, power-of-two scales). Each tensor-parallel rank runs its shard's matmul in FP8; the collectives, parameters, optimizer and checkpoints stay as without it. Needs a GPU with FP8 tensor cores (compute capability 8.9+: H100, H200, L40S) and torchao. None: no FP8 (the te_* keys can still turn it on)."""

    fp8_emulate: bool = False
    """neox, for tests only: run FP8 through torchao's emulation (float8 rounding, fp32 matmuls), which works on CPU and any GPU; slow."""

    te_columnparallel: bool = False
    """GPT-NeoX Transformer Engine key: true trains the block's column-parallel linears (attention query_key_value, MLP linear1) in FP8 through torchao (recipe: fp8_recipe, else tensorwise). The output layer stays in bf16."""

    te_rowparallel: bool = False
    """GPT-NeoX Transformer Engine key: true trains the block's row-parallel linears (attention dense, MLP linear2) in FP8 through torchao (recipe: fp8_recipe, else tensorwise)."""

    te_layernorm_mlp: bool = False
    """GPT-NeoX Transformer Engine key: true trains the MLP's linear1 and linear2 in FP8 through torchao (recipe: fp8_recipe, else tensorwise); the norm stays neox's."""

    te_mha: bool = False
    """GPT-NeoX Transformer Engine key: true trains the attention's query_key_value and dense in FP8 through torchao (recipe: fp8_recipe, else tensorwise); attention itself stays bf16 (SDPA / flash)."""

    te_fp8_format: Literal["e4m3", "hybrid"] = "hybrid"
    """GPT-NeoX Transformer Engine key: FP8 format of the tensorwise recipe: 'hybrid' (e4m3 forward, e5m2 gradients) or 'e4m3' (e4m3 gradients too). The rowwise recipe is e4m3 throughout."""

    te_fp8_wgrad: bool = True
    """GPT-NeoX Transformer Engine key: false computes the weight gradients in high precision (tensorwise: the wgrad matmul in bf16; rowwise: torchao's rowwise_with_gw_hp recipe)."""

    te_fp8_amax_history_len: int = 1
    """GPT-NeoX Transformer Engine key, accepted: Transformer Engine's delayed scaling keeps an amax history; neox scales dynamically from the current tensor (what history length 1 with most_recent gives), and the log says so."""

    te_fp8_amax_compute_algo: Literal["max", "most_recent"] = "most_recent"
    """GPT-NeoX Transformer Engine key, accepted: 'max' or 'most_recent' over the amax history; neox scales dynamically from the current tensor, and the log says so."""

    te_fp8_margin: int = 0
    """GPT-NeoX Transformer Engine key, accepted: Transformer Engine's scaling margin; neox's dynamic scales use the full FP8 range, and the log says so."""

    te_fp8_mha: bool = False
    """GPT-NeoX Transformer Engine key: FP8 attention (the softmax(QK^T)V kernel) is not implemented; only false is accepted."""
