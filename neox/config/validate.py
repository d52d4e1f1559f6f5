"""Cross-field rules, one small function each, run in order on the derived config.

Each rule raises ``derive.key_error(keys, message)``; NeoXArgs adds the file that set the first key.
Single-field types and enum values are checked earlier, when values are coerced to their field types.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from neox.config.derive import key_error, mlp_shape, num_kv_heads
from neox.errors import ConfigError

if TYPE_CHECKING:
    from neox.config.args import NeoXArgs
    from neox.config.model import ModelConfig

ATTENTION_TYPES = ("global", "flash")
ACTIVATIONS = ("gelu", "relu", "silu")
PARTITION_METHODS = ("parameters", "uniform")
LAUNCHERS = ("pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm")


# Model rules take the ModelConfig (derived, or built directly as tools and tests do) and the tensor-
# parallel size: the config runs them when it is read, GPTModel again for a config built directly.


def required_shape(m: ModelConfig, mp: int) -> None:
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings"):
        value = getattr(m, key)
        if value is None or value <= 0:
            raise key_error(key, f"expected a positive integer, got {value!r}")


def hidden_divisible_by_heads(m: ModelConfig, mp: int) -> None:
    if m.hidden_size % m.num_attention_heads:
        raise key_error(
            ("hidden_size", "num_attention_heads"),
            f"hidden_size {m.hidden_size} is not divisible by num_attention_heads {m.num_attention_heads}",
        )


def heads_divisible_by_kv_heads(m: ModelConfig, mp: int) -> None:
    nkv = num_kv_heads(m)
    if nkv <= 0 or nkv > m.num_attention_heads or m.num_attention_heads % nkv:
        raise key_error(
            ("num_kv_heads", "num_attention_heads"),
            f"num_attention_heads {m.num_attention_heads} is not divisible by num_kv_heads {nkv}",
        )


def heads_divisible_by_model_parallel(m: ModelConfig, mp: int) -> None:
    for key, value in (("num_attention_heads", m.num_attention_heads), ("num_kv_heads", num_kv_heads(m))):
        if value % mp:
            raise key_error((key, "model_parallel_size"), f"{key} {value} is not divisible by model_parallel_size {mp}")


def mlp_divisible_by_model_parallel(m: ModelConfig, mp: int) -> None:
    size = mlp_shape(m).intermediate_size
    if size % mp:
        raise key_error(
            ("intermediate_size", "model_parallel_size"),
            f"intermediate_size {size} is not divisible by model_parallel_size {mp}",
        )


def sequence_fits_positions(m: ModelConfig, mp: int) -> None:
    if m.pos_emb == "learned" and m.seq_length > m.max_position_embeddings:
        raise key_error(
            ("seq_length", "max_position_embeddings"),
            f"seq_length {m.seq_length} exceeds max_position_embeddings {m.max_position_embeddings}",
        )


def rotary_dims(m: ModelConfig, mp: int) -> None:
    if not 0.0 < m.rotary_pct <= 1.0:
        raise key_error("rotary_pct", f"expected a fraction in (0, 1], got {m.rotary_pct}")
    if m.pos_emb == "rotary" and int(m.hidden_size // m.num_attention_heads * m.rotary_pct) % 2:
        raise key_error("rotary_pct", f"{m.rotary_pct} gives an odd number of rotary channels per head "
                        "(the rotated part of each head must have an even number of dimensions)")


def known_attention_types(m: ModelConfig, mp: int) -> None:
    for kind in sorted(set(m.attention_config or [])):
        if kind not in ATTENTION_TYPES:
            raise key_error("attention_config", f"attention type {kind!r} is not supported (expected one of {ATTENTION_TYPES})")


def known_activation(m: ModelConfig, mp: int) -> None:
    if mlp_shape(m).activation not in ACTIVATIONS:
        raise key_error("activation", f"{m.activation!r} is not supported (expected gelu, relu, silu/swish, or swiglu/geglu/reglu)")


def dropout_probabilities(m: ModelConfig, mp: int) -> None:
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            raise key_error(key, f"expected a probability in [0, 1), got {getattr(m, key)}")


def sliding_window(m: ModelConfig, mp: int) -> None:
    if m.sliding_window_width is not None and m.sliding_window_width < 1:
        raise key_error("sliding_window_width", f"expected a positive number of earlier tokens, got {m.sliding_window_width}")


def unimplemented_model_features(m: ModelConfig, mp: int) -> None:
    """Model keys GPT-NeoX has and neox does not implement: an error when set, not a different model."""
    if m.use_qk_layernorm:
        raise key_error("use_qk_layernorm", "query/key layernorm is not implemented; set it to false")
    if m.output_layer_parallelism != "column":
        raise key_error("output_layer_parallelism", f"only 'column' (the output layer split by vocabulary) is "
                        f"implemented, got {m.output_layer_parallelism!r}; set 'column' (the trained model is the same)")


MODEL_RULES: list[Callable[[ModelConfig, int], None]] = [
    required_shape,
    known_attention_types,  # an architecture neox lacks (Mamba, RWKV, ...) first: its other keys may not apply
    hidden_divisible_by_heads,
    heads_divisible_by_kv_heads,
    heads_divisible_by_model_parallel,
    mlp_divisible_by_model_parallel,
    sequence_fits_positions,
    rotary_dims,
    known_activation,
    dropout_probabilities,
    sliding_window,
    unimplemented_model_features,
]


def validate_model(m: ModelConfig, model_parallel_size: int = 1) -> None:
    """Run the model rules; the first broken one raises a ConfigError."""
    for rule in MODEL_RULES:
        rule(m, model_parallel_size)


def model_rules(a: NeoXArgs) -> None:
    validate_model(a.model, a.parallel.model_parallel_size)


def vocab_divisible_by_model_parallel(a: NeoXArgs) -> None:
    v, mp = a.model.padded_vocab_size, a.parallel.model_parallel_size
    if v is not None and (v <= 0 or v % mp):
        raise key_error(("padded_vocab_size", "model_parallel_size"), f"{v} is not a positive multiple of model_parallel_size {mp}")


def parallel_sizes_positive(a: NeoXArgs) -> None:
    p = a.parallel
    if p.model_parallel_size < 1:
        raise key_error("model_parallel_size", f"expected an integer >= 1, got {p.model_parallel_size}")
    if p.pipe_parallel_size < 0:
        raise key_error("pipe_parallel_size", f"expected an integer >= 0, got {p.pipe_parallel_size}")


def pipeline_stages_fit_layers(a: NeoXArgs) -> None:
    if a.parallel.pipe_parallel_size > a.model.num_layers:
        raise key_error(
            ("pipe_parallel_size", "num_layers"),
            f"{a.parallel.pipe_parallel_size} pipeline stages but only {a.model.num_layers} layers",
        )


def pipeline_with_zero_stage(a: NeoXArgs) -> None:
    stage = int(a.optim.zero_optimization.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise key_error("zero_optimization", f"stage must be 0, 1, 2 or 3, got {stage}")
    if a.parallel.pipe_parallel_size >= 2 and stage >= 2:
        raise key_error(
            ("zero_optimization", "pipe_parallel_size"),
            f"DeepSpeed's pipeline engine supports ZeRO stage 0 or 1, got stage {stage} with {a.parallel.pipe_parallel_size} stages",
        )












def pipeline_settings(a: NeoXArgs) -> None:
    method = a.parallel.pipe_partition_method
    if method.lower() not in PARTITION_METHODS and not (method.lower().startswith("type:") and len(method) > 5):
        raise key_error("pipe_partition_method", f"expected 'parameters', 'uniform' or 'type:REGEX' (DeepSpeed's "
                        f"PipelineModule partition methods), got {method!r}")


def lr_scheduler_switches(a: NeoXArgs) -> None:
    if a.lr.override_lr_scheduler and a.lr.use_checkpoint_lr_scheduler:
        raise key_error(("override_lr_scheduler", "use_checkpoint_lr_scheduler"),
                        "both are set: take the schedule from the config (override) or the checkpoint, not both")


def one_half_precision(a: NeoXArgs) -> None:
    p = a.precision
    fp16, bf16 = bool(p.fp16.get("enabled")), bool(p.bf16.get("enabled"))
    if fp16 and bf16:
        raise key_error(("fp16", "bf16"), "fp16 and bf16 are both enabled; enable one")
    expected = "fp16" if fp16 else "bfloat16" if bf16 else "fp32"
    if p.precision != expected:
        raise key_error(("precision", "fp16", "bf16"), f"precision is {p.precision!r} but the fp16/bf16 blocks say {expected!r}")
    if a.model.fp32_residual_connection and expected != "fp32":
        raise key_error("fp32_residual_connection", f"only with fp32 parameters (precision fp32, optionally with "
                        f"torch_autocast); with {expected} parameters the residual stream is {expected}")


def compile_settings(a: NeoXArgs) -> None:
    if not 0.0 < a.model.torch_compile_memory_budget <= 1.0:
        raise key_error("torch_compile_memory_budget", f"expected a share in (0, 1], got {a.model.torch_compile_memory_budget}")


def master_weights_setup(a: NeoXArgs) -> None:
    """``optimizer_master_weights: true`` needs a setup it can replace (unset, neox chooses: fast_path)."""
    if not a.precision.optimizer_master_weights:
        return
    from neox.config.fast_path import MASTER_OPTIMIZERS, offloads_optimizer

    autocast = a.compat.get("torch_autocast") or {}
    dtype = str(autocast.get("dtype", "bfloat16")).replace("torch.", "")
    fp32_autocast = a.precision.precision == "fp32" and bool(autocast.get("enabled")) and dtype in ("bfloat16", "bf16")
    stage, dp = int(a.optim.zero_optimization.get("stage", 0)), a.parallel.data_parallel_size or 1
    needs = {
        "precision": (a.precision.precision in ("bfloat16", "fp32"),
                      f"needs precision bfloat16, or fp32 with torch_autocast in bf16 (got {a.precision.precision})"),
        "torch_autocast": (a.precision.precision != "fp32" or fp32_autocast,
                           "needs torch_autocast {enabled: true, dtype: bfloat16} with precision fp32 (or precision bfloat16)"),
        "zero_optimization": (stage == 0 or (stage == 1 and dp == 1),
                              f"needs zero_optimization.stage 0, or 1 at data parallel 1 (got stage {stage} at data "
                              f"parallel {dp}); the fp32 masters are replicated on every data-parallel rank"),
        "pipe_parallel_size": (a.parallel.pipe_parallel_size == 0,
                               f"needs pipe_parallel_size 0 (got {a.parallel.pipe_parallel_size})"),
        "optimizer": (str((a.optim.optimizer or {}).get("type", "AdamW")).lower() in MASTER_OPTIMIZERS,
                      f"needs optimizer.type Adam or AdamW (got {(a.optim.optimizer or {}).get('type')})"),
        "offload_optimizer": (not offloads_optimizer(a.optim.zero_optimization), "does not offload the optimizer to the CPU"),
        "fp32_residual_connection": (not a.model.fp32_residual_connection,
                                     "with bf16 parameters the residual stream is bf16; unset fp32_residual_connection"),
    }
    for key, (ok, why) in needs.items():
        if not ok:
            raise key_error(("optimizer_master_weights", key), why)


def mixture_weights_match_paths(a: NeoXArgs) -> None:
    d = a.data
    for split in ("train", "valid", "test"):
        paths, weights = getattr(d, f"{split}_data_paths"), getattr(d, f"{split}_data_weights")
        if weights and len(weights) != len(paths):
            raise key_error(
                f"{split}_data_weights", f"{len(weights)} weights for {len(paths)} {split}_data_paths"
            )
        if any(w < 0 for w in weights):
            raise key_error(f"{split}_data_weights", "weights must be >= 0")


def positive_counts(a: NeoXArgs) -> None:
    checks = {
        "checkpoint_num_layers": a.model.checkpoint_num_layers,
        "log_interval": a.logging.log_interval,
        "eval_interval": a.training.eval_interval,
        "train_iters": a.training.train_iters,
        "checkpoint_factor": a.checkpoint.checkpoint_factor,
    }
    for key, value in checks.items():
        if value is not None and value <= 0:
            raise key_error(key, f"expected a positive integer, got {value}")


def numeric_ranges(a: NeoXArgs) -> None:
    """Values of the right type but outside their meaning (they would train silently wrong or fail deep inside)."""
    m, o, lr = a.model, a.optim, a.lr
    checks = [
        ("rotary_emb_base", m.rotary_emb_base > 0 or m.pos_emb != "rotary", "expected a positive number"),
        ("rms_norm_epsilon", m.rms_norm_epsilon > 0, "expected a positive number"),
        ("layernorm_epsilon", m.layernorm_epsilon > 0, "expected a positive number"),
        ("init_method_std", m.init_method_std > 0, "expected a positive number"),
        ("lr", lr.lr is None or lr.lr >= 0, "expected a learning rate >= 0"),
        ("min_lr", lr.min_lr is None or (lr.min_lr >= 0 and (lr.lr is None or lr.min_lr <= lr.lr)),
         f"expected 0 <= min_lr <= lr ({lr.lr})"),
        ("warmup", lr.warmup is None or 0.0 <= lr.warmup <= 1.0, "expected a fraction of the decay iterations in [0, 1]"),
        ("weight_decay", o.weight_decay >= 0, "expected a number >= 0"),
        ("gradient_clipping", o.gradient_clipping >= 0, "expected a number >= 0 (0: no clipping)"),
        ("max_nan_iterations", a.training.max_nan_iterations >= 0, "expected an integer >= 0 (0: never stop)"),
        ("peak_theoretical_tflops", a.logging.peak_theoretical_tflops is None or a.logging.peak_theoretical_tflops > 0,
         "expected a positive number of TFLOP/s"),
        ("master_port", a.launcher.master_port is None or 0 < a.launcher.master_port < 65536,
         "expected a TCP port in [1, 65535] (or unset: chosen at launch)"),
        ("profile_step_start", not a.logging.profile or a.logging.profile_step_start >= 0,
         "expected an iteration >= 0"),
        ("profile_step_stop", not a.logging.profile or a.logging.profile_step_stop > a.logging.profile_step_start,
         f"expected an iteration after profile_step_start ({a.logging.profile_step_start})"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise key_error(key, f"{expected}, got {_value(a, key)!r}")


def _value(a: NeoXArgs, key: str) -> object:
    from neox.config.keys import field_sections

    return getattr(getattr(a, field_sections()[key]), key)


def checkpoint_and_split_values(a: NeoXArgs) -> None:
    ck = a.checkpoint
    if ck.s3_path is not None and not ck.s3_path.startswith("s3://"):
        raise key_error("s3_path", f"expected s3://bucket/prefix, got {ck.s3_path!r}")
    if ck.s3_chunk_size < 5 * 1024 * 1024:
        raise key_error("s3_chunk_size", f"S3 multipart parts are at least 5 MiB (5242880 bytes), got {ck.s3_chunk_size}")
    if ck.checkpoint_scale not in ("linear", "log"):
        raise key_error("checkpoint_scale", f"expected 'linear' or 'log', got {ck.checkpoint_scale!r}")
    try:
        parts = [float(x) for x in a.data.split.replace("/", ",").split(",") if x.strip()]
    except ValueError:
        parts = [-1.0]
    if len(parts) > 3 or any(x < 0 for x in parts) or sum(parts) <= 0:
        raise key_error("split", f"expected up to three non-negative numbers, not all zero, like '969,30,1'; got {a.data.split!r}")


def deepspeed_blocks_known(a: NeoXArgs) -> None:
    import difflib

    from neox.config.deepspeed import BLOCK_KEYS, unknown_block_keys

    blocks = {"fp16": a.precision.fp16, "bf16": a.precision.bf16, "zero_optimization": a.optim.zero_optimization}
    for block, values in blocks.items():
        for key in unknown_block_keys(block, values):
            close = difflib.get_close_matches(key, sorted(BLOCK_KEYS[block]), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise key_error(block, f"unknown DeepSpeed {block} key '{key}'{hint}")


def include_or_exclude(a: NeoXArgs) -> None:
    if a.launcher.include and a.launcher.exclude:
        raise key_error(("include", "exclude"), "DeepSpeed's runner takes include or exclude, not both")


def known_launcher(a: NeoXArgs) -> None:
    if a.launcher.launcher.lower() not in LAUNCHERS:
        raise key_error("launcher", f"{a.launcher.launcher!r} is not one of {LAUNCHERS}")


def fp8_settings(a: NeoXArgs) -> None:
    """GPT-NeoX's Transformer Engine keys neox maps onto torchao FP8; what it cannot do is an error."""
    p = a.precision
    if p.te_fp8_mha:
        raise key_error("te_fp8_mha", "FP8 attention is not implemented (the block linears can be FP8: te_mha, "
                        "te_layernorm_mlp or fp8_recipe); set it to false")
    if p.te_fp8_amax_history_len < 1:
        raise key_error("te_fp8_amax_history_len", f"expected a positive integer, got {p.te_fp8_amax_history_len}")
    if p.te_fp8_margin < 0:
        raise key_error("te_fp8_margin", f"expected an integer >= 0, got {p.te_fp8_margin}")


def text_generation_values(a: NeoXArgs) -> None:
    """generate.py's keys, checked wherever the config resolves so deepy.py reports them before launching."""
    tg = a.textgen
    checks = [
        ("maximum_tokens", tg.maximum_tokens >= 1, "expected an integer >= 1"),
        ("num_samples", tg.num_samples >= 1, "expected an integer >= 1"),
        ("temperature", tg.temperature >= 0.0, "expected a number >= 0 (0: greedy)"),
        ("top_k", tg.top_k >= 0, "expected an integer >= 0 (0: off)"),
        ("top_p", 0.0 <= tg.top_p <= 1.0, "expected a probability in [0, 1] (0: off)"),
        ("prompt_end", tg.prompt_end != "", "expected a non-empty separator"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise key_error(key, f"{expected}, got {getattr(tg, key)!r}")
    if tg.text_gen_type == "input-file" and not tg.sample_input_file:
        raise key_error(("sample_input_file", "text_gen_type"), "text_gen_type 'input-file' reads its prompts "
                        "from sample_input_file; set it to a text file")


RULES: list[Callable[[NeoXArgs], None]] = [
    parallel_sizes_positive,
    model_rules,
    vocab_divisible_by_model_parallel,
    pipeline_stages_fit_layers,
    pipeline_with_zero_stage,
    pipeline_settings,
    lr_scheduler_switches,
    one_half_precision,
    master_weights_setup,
    compile_settings,
    fp8_settings,
    mixture_weights_match_paths,
    positive_counts,
    numeric_ranges,
    checkpoint_and_split_values,
    deepspeed_blocks_known,
    include_or_exclude,
    known_launcher,
    text_generation_values,
]


def input_file_problems(a: NeoXArgs) -> Iterator[ConfigError]:
    """Each data, tokenizer, checkpoint or output path that is not usable here, as a one-line error.

    Not in RULES: a launch node may not see the files. The launch and every rank raise the first one
    (``input_files_exist``); ``deepy.py --dry-run`` lists them all as warnings.
    """
    d = a.data
    prefixes = [("data_path", d.data_path)] if d.data_path and not d.train_data_paths else []
    for split in ("train", "valid", "test"):
        prefixes += [(f"{split}_data_paths", p) for p in getattr(d, f"{split}_data_paths")]
    for key, prefix in prefixes:
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            yield key_error(key, f"{missing[0]}: dataset file not found (the path is the prefix without .bin/.idx)")
    for key in ("vocab_file", "merge_file"):
        path = getattr(a.tokenizer, key)
        if path and not os.path.isfile(path):
            yield key_error(key, f"{path}: file not found")
    ck = a.checkpoint
    # load == save is the resume-after-preemption setup: a first run has nothing there yet
    if ck.load and "://" not in ck.load and not os.path.exists(ck.load) and \
            os.path.abspath(ck.load) != os.path.abspath(ck.save or ""):
        yield key_error("load", f"{ck.load}: no such checkpoint directory (to resume a run, set load to its save directory)")
    for key, path in (("save", ck.save), ("log_dir", a.logging.log_dir), ("tensorboard_dir", a.logging.tensorboard_dir)):
        if path and "://" not in path:
            yield from _creatable_problems(key, path)


def input_files_exist(a: NeoXArgs) -> None:
    """Raise the first of ``input_file_problems`` (deepy.py calls it for local launches and every rank
    calls it before building anything)."""
    for problem in input_file_problems(a):
        raise problem


def _creatable_problems(key: str, path: str) -> Iterator[ConfigError]:
    """``path`` is a writable directory or can be made one, found out without writing anything."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        yield key_error(key, f"{path}: {probe} is a file, not a directory")
    elif not os.access(probe, os.W_OK | os.X_OK):
        yield key_error(key, f"{path}: {probe} is not writable")


def precision_runs_here(a: NeoXArgs, gpus: int) -> None:
    """fp16 needs a GPU: DeepSpeed's CPU accelerator refuses it deep inside initialize with a traceback.

    Not in RULES: ``--dry-run`` on a CPU login node plans GPU runs; the launch (``gpus`` detected
    here) and each rank (its device) call it.
    """
    if gpus == 0 and a.precision.precision == "fp16":
        raise key_error(("precision", "fp16"), "fp16 needs a GPU and none is visible here; on CPU use "
                        "precision: fp32 (or bf16: {enabled: true}), or launch where the GPUs are")


INFERENCE_SCRIPTS = ("generate.py", "eval.py")


def validate_for_script(a: NeoXArgs, user_script: str) -> None:
    """What the entry point ``user_script`` needs from the config beyond RULES; deepy.py calls it before
    launching (and before a dry run), so the error comes before any rank starts."""
    script = os.path.basename(user_script)
    if script in INFERENCE_SCRIPTS and a.parallel.pipe_parallel_size > 1:
        raise key_error("pipe_parallel_size", f"{script} runs the plain model; set 0 or 1 "
                        "(pipeline checkpoints load at any pipeline size)")
    if script == "generate.py" and a.textgen.text_gen_type is None:
        raise key_error("text_gen_type", "generate.py needs text_gen_type: 'unconditional', 'input-file' or "
                        "'interactive' (e.g. from configs/text_generation.yml)")


def script_input_problems(a: NeoXArgs, user_script: str) -> Iterator[ConfigError]:
    """The files ``user_script`` reads that are not here: the checkpoint of generate.py and eval.py (``load``,
    else the latest under ``save``) and generate.py's sample_input_file. Like ``input_file_problems``:
    warnings in a dry run, errors at a local launch and on the ranks."""
    script = os.path.basename(user_script)
    if script in INFERENCE_SCRIPTS:
        yield from _checkpoint_to_read_problems(a, script)
    tg = a.textgen
    if script == "generate.py" and tg.text_gen_type == "input-file" and tg.sample_input_file \
            and not os.path.isfile(tg.sample_input_file):
        yield key_error("sample_input_file", f"{tg.sample_input_file}: file not found (the prompts of "
                        "text_gen_type 'input-file')")


def _checkpoint_to_read_problems(a: NeoXArgs, script: str) -> Iterator[ConfigError]:
    from neox.config.run import inference_load_dir

    ck = a.checkpoint
    where = inference_load_dir(ck)
    if where is None:
        held = f"save ({ck.save}) holds none (no latest file there)" if ck.save else "neither is save"
        yield key_error(("load", "save"), f"{script} needs a checkpoint: set load, or train first so that save "
                        f"holds one; load is not set and {held}")
    elif "://" not in where and (os.path.isdir(where) or os.path.abspath(where) == os.path.abspath(ck.save or "")) \
            and not os.path.isfile(os.path.join(where, "latest")) and not _holds_model_files(where):
        # a missing load folder is input_file_problems' warning, except load == save (the resume setup)
        yield key_error("load", f"{where}: no checkpoint there (expected a latest file or DeepSpeed "
                        "mp_rank_XX_model_states.pt / layer_XX-model_YY-model_states.pt files)")


def _holds_model_files(path: str) -> bool:
    return os.path.isdir(path) and any(name.endswith("model_states.pt") for name in os.listdir(path))


def script_inputs_exist(a: NeoXArgs, user_script: str) -> None:
    """Raise the first of ``script_input_problems`` (deepy.py before a local launch, generate.py on each rank)."""
    for problem in script_input_problems(a, user_script):
        raise problem


def validate(args: NeoXArgs) -> None:
    """Run every rule; the first broken one raises a ConfigError."""
    for rule in RULES:
        rule(args)
