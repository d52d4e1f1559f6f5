"""The DeepSpeed config derived from NeoXArgs (the dict handed to ``deepspeed.initialize``).

The block whitelists are DeepSpeed 0.19.8's (pyproject pins ``deepspeed>=0.19.8,<0.20``); the rest of the
DeepSpeed knowledge lives in ``neox.training.engine``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from neox.config import compat, fast_path
from neox.errors import ConfigError

if TYPE_CHECKING:
    from neox.config.args import NeoXArgs

# Fields DeepSpeed 0.19.8 accepts in each block (its pydantic models forbid others).
FP16_KEYS = frozenset(
    "auto_cast consecutive_hysteresis enabled fp16_master_weights_and_grads hysteresis initial_scale_power "
    "loss_scale loss_scale_window min_loss_scale".split()
)
BF16_KEYS = frozenset(
    "bf16_master_weights_and_grads bf16_optimizer_states check_grad_overflow enabled immediate_grad_update".split()
)
ZERO_KEYS = frozenset(
    "allgather_bucket_size allgather_partitions allgather_sequential compute_grad_norm contiguous_gradients "
    "cpu_offload cpu_offload_param cpu_offload_use_pin_memory elastic_checkpoint enable_sanity_checks "
    "gather_16bit_weights_on_model_save ignore_unused_parameters leaf_module legacy_stage1 load_from_fp32_weights "
    "log_trace_cache_warnings max_live_parameters max_reuse_distance memory_efficient_linear "
    "model_persistence_threshold module_granularity_threshold offload_optimizer offload_param overlap_comm "
    "override_module_apply param_persistence_threshold parameter_alignment pipeline_loading_checkpoint "
    "prefetch_bucket_size reduce_bucket_size reduce_scatter round_robin_gradients "
    "save_muon_momentum_buffer_in_memory stage stage3_allgather_sequential "
    "stage3_gather_16bit_weights_on_model_save stage3_gather_fp16_weights_on_model_save "
    "stage3_max_live_parameters stage3_max_reuse_distance stage3_model_persistence_threshold "
    "stage3_module_granularity_threshold stage3_param_persistence_threshold stage3_prefetch_bucket_size "
    "stage3_use_all_reduce_for_fetch_params sub_group_size use_all_reduce_for_fetch_params "
    "use_multi_rank_bucket_allreduce zenflow zero_hpz_partition_size zero_quantized_gradients "
    "zero_quantized_nontrainable_weights zero_quantized_weights".split()
)
# keys old NeoX configs put in these blocks that DeepSpeed never read (e.g. "fp16": {"fp16": true, ...})
LEGACY_BLOCK_KEYS = frozenset({"fp16", "bf16", "type"})
BLOCK_KEYS = {"fp16": FP16_KEYS, "bf16": BF16_KEYS, "zero_optimization": ZERO_KEYS}


def unknown_block_keys(block: str, values: dict[str, Any]) -> list[str]:
    """Keys of a DeepSpeed block (fp16, bf16, zero_optimization) that DeepSpeed would reject."""
    return sorted(k for k in values if k not in BLOCK_KEYS[block] and k not in LEGACY_BLOCK_KEYS)


def _clean(block: str, values: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in values.items() if k in BLOCK_KEYS[block]}


# DeepSpeed's CPU shared-memory all-reduce buffer (deepspeed/ops/csrc/cpu/comm/shm.cpp), which it never
# unlinks; named here, torch-free, for the ranks (training.engine) and the launcher (killed ranks' buffers).
SHM_DIR = "/dev/shm"
CPU_ALLREDUCE_BUFFER = "deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"

# DeepSpeed prints its own loss line every steps_per_print steps; neox logs by log_interval instead.
QUIET_STEPS_PER_PRINT = 10**9


def zero_config(zero: dict[str, Any]) -> dict[str, Any]:
    """NeoX's zero_optimization block for DeepSpeed 0.19: ``cpu_offload`` (removed there) becomes
    ``offload_optimizer``."""
    out = _clean("zero_optimization", zero or {})
    out.setdefault("stage", 0)
    if "cpu_offload" in out:
        if out.pop("cpu_offload"):
            out.setdefault("offload_optimizer", {"device": "cpu"})
    return out


def build_deepspeed_config(args: NeoXArgs) -> dict[str, Any]:
    """The config for ``deepspeed.initialize``, without optimizer or scheduler blocks: neox builds the
    optimizer and the LR schedule itself and hands DeepSpeed the objects (``training/optim.py``);
    ``neox.training.engine.runtime_config`` adjusts it to them at the start of a run."""
    t, p = args.training, args.precision
    config: dict[str, Any] = {
        "train_batch_size": t.train_batch_size,
        "train_micro_batch_size_per_gpu": t.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": args.optim.gradient_clipping,
        "zero_optimization": zero_config(args.optim.zero_optimization),
        "fp16": _clean("fp16", p.fp16) if p.fp16 else {"enabled": False},
        "bf16": _clean("bf16", p.bf16) if p.bf16 else {"enabled": False},
        "wall_clock_breakdown": args.logging.wall_clock_breakdown,
        "steps_per_print": QUIET_STEPS_PER_PRINT,
        "zero_allow_untested_optimizer": args.optim.zero_allow_untested_optimizer,
        # DeepSpeed's throughput timer synchronises the GPU at every forward and step (measured on an
        # H100: 7 ms idle in a 255 ms step); neox times its own log intervals.
        "timers": {"throughput": {"enabled": False}},
    }
    if p.data_types:
        config["data_types"] = copy.deepcopy(p.data_types)
    if p.communication_data_type:
        config["communication_data_type"] = p.communication_data_type
    elif p.fp32_allreduce:
        config["communication_data_type"] = "fp32"
    for key in compat.DEEPSPEED_PASSTHROUGH:
        if key in args.compat and key != "deepspeed_extra_args" and args.compat[key] is not None:
            config[key] = copy.deepcopy(args.compat[key])
    fast_path.deepspeed_overrides(args, config)
    extra = args.compat.get("deepspeed_extra_args") or {}
    for key in ("optimizer", "scheduler"):
        if key in extra:
            raise ConfigError(f"deepspeed_extra_args.{key}: neox builds the {key} itself and hands DeepSpeed the object; "
                              f"set it with the {'optimizer' if key == 'optimizer' else 'lr_decay_style/warmup/min_lr'} keys")
    config.update(copy.deepcopy(extra))
    return config
