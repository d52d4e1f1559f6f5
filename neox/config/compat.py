"""GPT-NeoX keys that neox accepts without implementing them, so real NeoX configs resolve unchanged.

``NO_EFFECT`` keys (kernel fusions, profiling, legacy flags) are stored in ``args.compat`` and ignored.
``UNSUPPORTED`` keys name NeoX features neox does not have (MoE, muP, DPO, Comet, bitsandbytes, ...):
they are accepted only at their NeoX default, so a config that turns one on fails loudly instead of
training something else. A key belongs in ``NO_EFFECT`` only if a user who sets it expects nothing
neox would do differently (a kernel choice, a value NeoX itself derives, a setting of an unsupported
feature that is only read when that feature is on).
``DEEPSPEED_PASSTHROUGH`` keys are copied into the DeepSpeed config as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NO_EFFECT: dict[str, str] = {
    # kernel fusions: neox picks its kernels itself (flash/SDPA, fused AdamW, torch.compile)
    "scaled_upper_triang_masked_softmax_fusion": "softmax fusion; neox uses SDPA / flash attention",
    "scaled_masked_softmax_fusion": "softmax fusion; neox uses SDPA / flash attention",
    "bias_gelu_fusion": "bias+gelu fusion",
    "bias_dropout_fusion": "bias+dropout fusion",
    "rope_fusion": "fused rotary kernel",
    "layernorm_fusion": "fused LayerNorm kernel",
    "rmsnorm_fusion": "fused RMSNorm kernel",
    "use_flashattn_swiglu": "flash-attn's swiglu kernel",
    "mamba_selective_scan_fusion": "Mamba kernel fusion",
    "mamba_causal_conv_fusion": "Mamba kernel fusion",
    "mamba_inner_func_fusion": "Mamba kernel fusion",
    "use_cpu_initialization": "neox initialises full tensors from the seed on any device",
    # numerics neox always has: what these ask for is what it does anyway
    "attention_softmax_in_fp32": "the attention softmax is always fp32: flash-attn and PyTorch's SDPA kernels keep "
                                 "its max and sum in fp32 whatever the input dtype",
    "apply_query_key_layer_scaling": "Megatron's fp16 overflow guard (scores scaled by 1/layer, undone in an fp32 "
                                     "softmax) gives the same attention; neox's softmax is fp32 already",
    "fp16_lm_cross_entropy": "the loss is always computed in fp32 from the half-precision logits (the vocab-parallel "
                             "cross entropy upcasts; compiled, the upcast fuses into the loss)",
    "fused_kernels_build_path": "neox builds no fused kernels (PyTorch and torch.compile provide them)",
    "scalenorm_epsilon": "scalenorm is not implemented (norm must be layernorm or rmsnorm)",
    "rpe_num_buckets": "relative position embeddings are not implemented",
    "rpe_max_distance": "relative position embeddings are not implemented",
    "gmlp_attn_dim": "gMLP is not implemented",
    "param_sharing_style": "layer sharing is not implemented",
    "mamba_selective_fp32_params": "Mamba is not implemented",
    "mamba_use_bias_in_conv": "Mamba is not implemented",
    "mamba_use_bias_in_linears": "Mamba is not implemented",
    "dim_att": "RWKV is not implemented",
    "head_size": "RWKV is not implemented",
    "ffn_dim": "RWKV is not implemented",
    "expert_interval": "MoE is not implemented",
    "is_pipe_parallel": "derived from pipe_parallel_size",
    # activation checkpointing details: neox checkpoints whole blocks
    "synchronize_each_layer": "CUDA synchronise around checkpointed layers",
    "deepspeed_activation_checkpointing": "deprecated in NeoX",
    "contiguous_checkpointing": "contiguous activation-checkpoint memory",
    # optimizer flags NeoX derives from the DeepSpeed dicts
    "optimizer_type": "derived from optimizer.type",
    "zero_stage": "derived from zero_optimization.stage (NeoX overwrites it too)",
    "zero_reduce_scatter": "derived from zero_optimization",
    "zero_contiguous_gradients": "derived from zero_optimization",
    "zero_reduce_bucket_size": "derived from zero_optimization",
    "zero_allgather_bucket_size": "derived from zero_optimization",
    # NeoX too reads loss scaling from the fp16 dict; these top-level copies are overwritten there
    "hysteresis": "set it in the fp16 dict",
    "dynamic_loss_scale": "set it in the fp16 dict",
    "loss_scale": "set it in the fp16 dict",
    "loss_scale_window": "set it in the fp16 dict",
    "min_scale": "set it in the fp16 dict",
    # settings of features that are unsupported (see UNSUPPORTED): they matter only when the feature is on
    "git_hash": "recorded automatically",
    "gradient_noise_scale_n_batches": "only read with log_gradient_noise_scale (unsupported)",
    "gradient_noise_scale_cpu_offload": "only read with log_gradient_noise_scale (unsupported)",
    "comet_workspace": "only read with use_comet (unsupported)",
    "comet_project": "only read with use_comet (unsupported)",
    "comet_experiment_name": "only read with use_comet (unsupported)",
    "comet_tags": "only read with use_comet (unsupported)",
    "comet_others": "only read with use_comet (unsupported)",
    "memory_profiling_path": "only read with memory_profiling (unsupported)",
    # process and runner state NeoX stores on its args object
    "distributed_backend": "nccl on GPU, gloo on CPU, chosen automatically (NeoX configs say nccl and are run on CPU)",
    "local_rank": "set by the launcher",
    "rank": "set by the launcher",
    "global_num_gpus": "derived (world_size)",
    "user_script": "given on the deepy.py command line",
    "iteration": "training state, not a config value",
    "do_train": "training state",
    "do_valid": "training state",
    "do_test": "training state",
    "config_files": "recorded automatically",
    "short_seq_prob": "unused in GPT pretraining",
    "adlr_autoresume_interval": "only read with adlr_autoresume (unsupported)",
    "onnx_safe": "not needed",
    "deepscale": "deprecated in NeoX",
    "deepscale_config": "deprecated in NeoX",
    "deepspeed": "always true",
    "allow_chopped": "only used by NeoX's non-default packing",
    "no_ssh_check": "passed to the DeepSpeed runner only when true",
    "curriculum_seqlen": "curriculum learning is not supported",
}

# Typed fields (documented in docs/config.md) that change nothing, and why; tests/unit/
# test_config_fields_consumed.py fails for a typed field that is neither read nor listed here.
NO_EFFECT_FIELDS: dict[str, str] = {
    "steps_per_print": "DeepSpeed's own loss print; neox hands DeepSpeed a value that keeps it quiet and logs by "
                       "log_interval",
    "output_layer_parallelism": "only 'column' is accepted (validation refuses 'row'), which is how neox always "
                                "splits the output layer",
    "te_fp8_mha": "only false is accepted (validation refuses FP8 attention): attention runs in bf16 (SDPA / flash)",
}

# key -> NeoX default; any other value is an error (the feature is not implemented).
UNSUPPORTED: dict[str, Any] = {
    # switches a user turns on expecting something to happen
    "use_bnb_optimizer": False,
    "use_comet": None,
    "comet_experiment": None,
    "memory_profiling": False,
    "log_grad_pct_zeros": False,
    "log_optimizer_states": False,
    "log_gradient_noise_scale": False,
    "char_level_ppl": False,
    "return_logits": False,
    "precompute_model_name": None,
    "rotary_save_freqs_buffer": False,
    "opt_pos_emb_offset": 0,
    "checkpoint_in_cpu": False,
    "profile_backward": False,
    "lazy_mpu_init": False,
    "adlr_autoresume": False,
    "use_shared_fs": True,
    "load_universal": False,
    "force_multi": False,
    "detect_nvlink_pairs": False,
    "autotuning_run": None,
    "amp": None,
    "scheduler": None,
    "tensorboard": None,
    "wandb": None,
    "csv_monitor": None,
    # online / reinforcement learning and weight serving
    "serve_model_weights": False,
    "weight_server_port": 6000,
    "online_dataserver_ips": "localhost",
    "online_dataserver_ports": 10000,
    "fp32_reinforce": True,
    "kl_impl": "mse",
    "kl_div_beta": 0.1,
    "reinforce_leave_one_out": False,
    "moe_router_type": "sinkhorn",
    "moe_expert_interval": 1,
    "train_epochs": None,
    "use_mup": False,
    "coord_check": False,
    "save_base_shapes": False,
    "base_shapes_file": None,
    "mup_init_scale": 1.0,
    "mup_attn_temp": 1.0,
    "mup_output_temp": 1.0,
    "mup_embedding_mult": 1.0,
    "mup_rp_embedding_mult": 1.0,
    "mup_width_scale": 2,
    "moe_num_experts": 1,
    "moe_top_k": 1,
    "moe_type": "megablocks",
    "moe_loss_coeff": 0.1,
    "moe_train_capacity_factor": 1.0,
    "moe_eval_capacity_factor": 1.0,
    "moe_min_capacity": 4,
    "moe_token_dropping": False,
    "moe_use_residual": True,
    "moe_expert_parallel_size": 1,
    "moe_glu": False,
    "moe_lbl_in_fp32": False,
    "moe_jitter_eps": None,
    "use_tutel": False,
    "create_moe_param_group": True,
    "enable_expert_tensor_parallelism": False,
    "train_impl": "normal",
    "dataset_impl": "gpt2",
    "pack_impl": "packed",
    "dpo_fp32": True,
    "dpo_reference_free": False,
    "dpo_beta": 0.1,
    "kto_fp32": True,
    "kto_desirable_weight": 1.0,
    "kto_undesirable_weight": 1.0,
    "kto_beta": 0.1,
    "z_loss": 0.0,
    "train_label_data_paths": None,
    "valid_label_data_paths": None,
    "test_label_data_paths": None,
    "train_reward_data_paths": None,
    "valid_reward_data_paths": None,
    "test_reward_data_paths": None,
    "pos_train_data_paths": None,
    "neg_train_data_paths": None,
    "pos_valid_data_paths": None,
    "neg_valid_data_paths": None,
    "pos_test_data_paths": None,
    "neg_test_data_paths": None,
    "pos_train_label_data_paths": None,
    "neg_train_label_data_paths": None,
    "pos_valid_label_data_paths": None,
    "neg_valid_label_data_paths": None,
    "pos_test_label_data_paths": None,
    "neg_test_label_data_paths": None,
    "soft_prompt_tuning": None,
    "num_unique_layers": None,
    "sparsity_config": None,
    "model_arch": "gpt2",
    "extra_sentinel_tokens": 0,
    "weighted_document_limit": None,
    "curriculum_learning": None,
    "data_efficiency": None,
    "sparse_attention": None,
    "elasticity": None,
    "compression_training": None,
    "autotuning": None,
    "label_data_paths": None,
}

# What to use instead, appended to the error for an UNSUPPORTED key set away from its default.
UNSUPPORTED_HINTS: dict[str, str] = {
    "use_bnb_optimizer": "neox trains with the optimizer dict's Adam/AdamW; remove use_bnb_optimizer",
    "use_comet": "log with use_wandb or tensorboard_dir",
    "memory_profiling": "max_memory_gib in metrics.jsonl is the peak per rank; profile: true traces kernels",
    "scheduler": "neox schedules the learning rate itself (lr_decay_style, warmup, min_lr)",
    "tensorboard": "use tensorboard_dir",
    "wandb": "use use_wandb",
    "csv_monitor": "neox writes {log_dir}/metrics.jsonl",
    "load_universal": "load a neox checkpoint (tools/reshard_checkpoint.py changes its layout)",
}

# Copied into the DeepSpeed config unchanged (DeepSpeed's own keys).
DEEPSPEED_PASSTHROUGH: dict[str, str] = {
    "prescale_gradients": "DeepSpeed: scale gradients before all-reduce",
    "gradient_predivide_factor": "DeepSpeed: divide gradients by this before all-reduce",
    "sparse_gradients": "DeepSpeed: sparse embedding gradients",
    "dump_state": "DeepSpeed: print the engine state after initialisation",
    "flops_profiler": "DeepSpeed flops profiler block",
    "comms_logger": "DeepSpeed communication logger block",
    "activation_checkpointing": "DeepSpeed activation checkpointing block",
    "checkpoint": "DeepSpeed checkpoint block (e.g. {tag_validation, load_universal})",
    "torch_autocast": "DeepSpeed torch_autocast block ({enabled, dtype}): fp32 parameters, bf16/fp16 compute",
    "deepspeed_extra_args": "dict merged into the DeepSpeed config as is",
}


def is_default(value: Any, default: Any) -> bool:
    """True when ``value`` leaves an unsupported feature off (its NeoX default, or empty)."""
    if value == default:
        return True
    if isinstance(value, dict) and value.get("enabled") is False:
        return True
    return value in (None, [], {}) and default in (None, [], {}, False)


# The transformer-block linears FP8 can apply to (attribute names inside Attention / MLP).
BLOCK_LINEARS = ("query_key_value", "dense", "linear1", "linear2")
_TE_LAYERS = {
    "te_mha": ("query_key_value", "dense"),
    "te_layernorm_mlp": ("linear1", "linear2"),
    "te_columnparallel": ("query_key_value", "linear1"),
    "te_rowparallel": ("dense", "linear2"),
}
_TE_SCALING = {"te_fp8_amax_history_len": 1, "te_fp8_amax_compute_algo": "most_recent", "te_fp8_margin": 0}


@dataclass(frozen=True)
class Fp8Plan:
    """What FP8 training does: torchao recipe name, which block linears, gradient format, emulation."""

    recipe: str  # torchao recipe: tensorwise | rowwise | rowwise_with_gw_hp
    linears: tuple[str, ...]
    grad_dtype: str  # e5m2 | e4m3 (tensorwise only; rowwise is e4m3 throughout)
    hp_wgrad: bool  # weight-gradient matmul in high precision
    emulate: bool
    note: str | None  # one log line when GPT-NeoX's Transformer Engine keys asked for it


def fp8_plan(p: Any) -> Fp8Plan | None:
    """The FP8 setup a PrecisionConfig asks for (fp8_recipe and GPT-NeoX's te_* keys), None for bf16.

    fp8_recipe covers every block linear; without it the te_* layer keys pick theirs, tensorwise.
    """
    te_on = [k for k in _TE_LAYERS if getattr(p, k)]
    if p.fp8_recipe is None and not te_on:
        return None
    linears = BLOCK_LINEARS if p.fp8_recipe else tuple(n for n in BLOCK_LINEARS if any(n in _TE_LAYERS[k] for k in te_on))
    recipe = p.fp8_recipe or "tensorwise"
    if not p.te_fp8_wgrad:
        recipe = "rowwise_with_gw_hp" if recipe == "rowwise" else recipe
    note = None
    changed = [k for k, default in _TE_SCALING.items() if getattr(p, k) != default]
    if te_on or changed:
        note = (f"FP8 {recipe} for {', '.join(linears)} via torchao ({', '.join(te_on + changed) or 'fp8_recipe'}): "
                "Transformer Engine's delayed scaling (te_fp8_amax_history_len, te_fp8_amax_compute_algo, "
                "te_fp8_margin) is not used; neox scales each tensor dynamically from its current amax")
    grad = "e4m3" if p.te_fp8_format == "e4m3" or recipe != "tensorwise" else "e5m2"
    return Fp8Plan(recipe, linears, grad, not p.te_fp8_wgrad, p.fp8_emulate, note)
