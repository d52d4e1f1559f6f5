"""TrainingConfig, CheckpointConfig, LoggingConfig, TextGenConfig and LauncherConfig."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TrainingConfig:
    """Training-loop arguments (batch sizes: any two of the three determine the third)."""

    train_iters: int | None = None
    """Optimizer steps to train for."""

    train_batch_size: int | None = None
    """Global batch size in samples: micro-batch * gradient accumulation * data-parallel size."""

    train_micro_batch_size_per_gpu: int | None = None
    """Samples per rank per forward/backward pass."""

    gradient_accumulation_steps: int | None = None
    """Micro-batches accumulated per optimizer step."""

    seed: int = 1234
    """Seed of Python, NumPy and torch RNGs, and of the weight init."""

    eval_interval: int = 1000
    """Evaluate on the validation set every this many iterations."""

    eval_iters: int = 100
    """Batches per evaluation."""

    exit_interval: int | None = None
    """Exit after the iteration that is a multiple of this value."""

    kill_switch_path: str | None = None
    """If this file exists, save a checkpoint and stop."""

    max_nan_iterations: int = 100
    """Stop when this many consecutive iterations give a non-finite loss."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint arguments."""

    save: str | None = None
    """Directory to save checkpoints to ({save}/global_step{N}, {save}/latest)."""

    load: str | None = None
    """Directory to load a checkpoint from (the tag named in {load}/latest)."""

    checkpoint_factor: int | None = None
    """Save every this many iterations (NeoX; save_interval is an alias)."""

    extra_save_iters: list[int] = field(default_factory=list)
    """Also save at these iterations."""

    checkpoint_scale: str = "linear"
    """'linear': every checkpoint_factor iterations; 'log': at powers of checkpoint_factor."""

    finetune: bool = False
    """Load weights only (no optimizer, schedule or iteration) from `load`."""

    no_save_optim: bool = False
    """Do not save the optimizer state."""

    no_save_rng: bool = False
    """Do not save the RNG state."""

    no_load_optim: bool = False
    """Do not load the optimizer state."""

    no_load_rng: bool = False
    """Do not load the RNG state."""

    s3_path: str | None = None
    """s3://bucket/prefix to upload each saved checkpoint to, in the background. The run waits for its uploads before it ends (exiting non-zero if one failed), and a run started with it first uploads the local checkpoints the bucket lacks."""

    s3_chunk_size: int = 104_857_600
    """Multipart upload chunk size in bytes."""

    keep_last_n_checkpoints: int | None = None
    """Delete older local checkpoints, keeping this many."""

    checkpoint_validation_with_forward_pass: bool = False
    """Save a forward pass's logits with the checkpoint and check them after loading."""


def inference_load_dir(ck: CheckpointConfig) -> str | None:
    """The checkpoint folder an inference entry point (generate.py, an evaluation) reads: ``load`` if
    set, else ``save`` when it holds a checkpoint (a ``latest`` file), else None. Training resumes by
    the same rule (``neox.training.pretrain.resume_from_save``)."""
    if ck.load:
        return ck.load
    if ck.save and "://" not in ck.save and os.path.isfile(os.path.join(ck.save, "latest")):
        return ck.save
    return None


@dataclass(frozen=True)
class LoggingConfig:
    """Logging arguments."""

    log_dir: str | None = None
    """Directory for logs and metrics.jsonl."""

    log_interval: int = 100
    """Log every this many iterations."""

    tensorboard_dir: str | None = None
    """Write TensorBoard events here."""

    use_wandb: bool | None = False
    """Log to Weights & Biases (key from WANDB_API_KEY or ~/.netrc). null (GPT-NeoX's default): log when a key is found."""

    wandb_project: str = "neox"
    """W&B project."""

    wandb_group: str | None = None
    """W&B run group."""

    wandb_team: str | None = None
    """W&B team (entity)."""

    wandb_host: str = "https://api.wandb.ai"
    """W&B server URL."""

    wandb_init_all_ranks: bool = False
    """Start a W&B run on every rank (same group; with wandb_run_name, named NAME-rankN), each logging its own copy of the train records; console, metrics.jsonl and TensorBoard stay on rank 0."""

    wandb_run_name: str | None = None
    """W&B run name (wandb.init's name); None lets W&B choose one."""

    peak_theoretical_tflops: float | None = None
    """Peak TFLOP/s of one device, the denominator of the logged MFU. None: $NEOX_PEAK_TFLOPS, else the dense bf16 datasheet peak of a known GPU (H100/H200/A100/...), else MFU is not logged."""

    wall_clock_breakdown: bool = False
    """Time the forward, backward and optimizer steps (DeepSpeed wall_clock_breakdown)."""

    profile: bool = False
    """Run torch.profiler over iterations [profile_step_start, profile_step_stop) and write a Chrome trace, a kernel table and a GPU time summary to <log_dir>/profile (NeoX's key; NeoX drives nsys instead)."""

    profile_step_start: int = 10
    """Profiling starts before the step that begins at this iteration (NeoX's count of finished iterations; the step is logged as iteration profile_step_start + 1)."""

    profile_step_stop: int = 12
    """Profiling stops after the step that ends at this iteration (exclusive start: profile_step_stop - profile_step_start steps are profiled)."""

    log_grad_norm: bool = False
    """Add each parameter's gradient L2 norm (the full tensor, after the data-parallel reduction, before clipping) to the logged records as grad_norms {name: norm} and grad_norm_total; W&B/TensorBoard get them as gradient_norms/NAME (GPT-NeoX's names). The global grad_norm is in every record regardless. Computed each step (one norm per parameter, a collective), on the plain and the pipeline engine (there inside train_batch, right before its optimizer step; stages gathered)."""

    log_param_norm: bool = False
    """Add each parameter's L2 norm (the full tensor over tensor-parallel shards and pipeline stages) to the logged records as param_norms {name: norm} and their total param_norm; W&B/TensorBoard get them as parameter_norms/NAME (GPT-NeoX's names). Computed at logged iterations."""

    steps_per_print: int = 10
    """NeoX key, no effect: DeepSpeed's own loss print, which neox keeps quiet (it logs by log_interval)."""


@dataclass(frozen=True)
class TextGenConfig:
    """Text-generation arguments (generate.py). Their values are checked when the config resolves; what
    generate.py needs besides (text_gen_type, a checkpoint, the prompts file) is checked by deepy.py
    before it launches (``neox.config.validate.validate_for_script``)."""

    text_gen_type: Literal["unconditional", "input-file", "interactive"] | None = None
    """How generate.py samples (required there): 'unconditional' (num_samples samples from the EOD token), 'input-file' (one completion per prompt of sample_input_file) or 'interactive' (prompts read from stdin). GPT-NeoX's 'precompute' is not implemented."""

    sample_input_file: str | None = None
    """Prompts for text_gen_type 'input-file', separated by prompt_end."""

    sample_output_file: str = "samples.txt"
    """Where generated samples are written (JSON lines {"context", "text"})."""

    num_samples: int = 1
    """Unconditional samples to generate (>= 1)."""

    maximum_tokens: int = 64
    """Tokens generated per prompt (>= 1; fewer when the context would exceed max_position_embeddings)."""

    temperature: float = 0.0
    """Sampling temperature (>= 0); 0 is greedy."""

    top_k: int = 0
    """Sample only among the k most likely tokens (>= 0; 0: off)."""

    top_p: float = 0.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p (in [0, 1]; 0 or 1: off)."""

    recompute: bool = False
    """Recompute all attention each step instead of using the KV cache."""

    prompt_end: str = "\n"
    """Separator that ends a prompt in sample_input_file (not empty)."""


@dataclass(frozen=True)
class LauncherConfig:
    """Launcher arguments (deepy.py)."""

    launcher: str = "pdsh"
    """Multi-node launcher: 'pdsh', 'openmpi', 'mvapich', 'slurm', ... ('slurm' with deepspeed_slurm uses srun)."""

    deepspeed_slurm: bool = False
    """Start ranks with srun directly (one task per GPU) instead of the DeepSpeed runner."""

    hostfile: str | None = None
    """DeepSpeed hostfile ('host slots=N' lines)."""

    include: str | None = None
    """Hosts/GPUs to use, DeepSpeed syntax (e.g. 'worker-0:0,1@worker-1')."""

    exclude: str | None = None
    """Hosts/GPUs to leave out, DeepSpeed syntax."""

    num_nodes: int = -1
    """Nodes to use (-1: all in the hostfile, 1 without one)."""

    num_gpus: int | None = None
    """Ranks per node (-1 or None: every visible GPU); more than this machine's GPUs is refused at launch. On a machine without GPUs, the number of CPU ranks (unset: model_parallel_size x pipeline stages)."""

    master_port: int | None = None
    """Rendezvous port (unset: a free port for a run on this machine alone; 29500 with a hostfile or srun, where every node must agree on it)."""

    master_addr: str | None = None
    """Rendezvous address (None: the first host)."""

    deepspeed_mpi: bool = False
    """Each rank reads its RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR from MPI (a job started by mpirun) through DeepSpeed's mpi_discovery, as GPT-NeoX does; needs mpi4py. MASTER_PORT is master_port (unset: 29500)."""

    comment: str | None = None
    """Passed as --comment to srun (some clusters require it)."""

    account: str | None = None
    """Passed as --account to srun."""


@dataclass(frozen=True)
class EvalConfig:
    """lm-evaluation-harness tasks (eval.py, and in training at every eval_interval); needs the ``eval`` extra."""

    eval_tasks: list[str] = field(default_factory=list)
    """Harness task or group names to run (e.g. lambada_openai hellaswag); in training they run at every eval_interval and at the end."""

    eval_results_prefix: str = ""
    """Results go to {eval_results_prefix}_eval_results_<time>.json (empty: <log_dir or .>/eval_results_<time>.json)."""

    eval_tasks_include_path: list[str] = field(default_factory=list)
    """Folders of task YAMLs handed to the harness's TaskManager (local and custom tasks, offline)."""

    eval_num_fewshot: int | None = None
    """Few-shot examples per request (None: each task's own default)."""

    eval_limit: float | None = None
    """Documents per task: an integer count, or a fraction below 1 (None: all)."""

    eval_batch_size: int = 8
    """Requests per forward pass (loglikelihood) and sequences decoded together (generate_until)."""

    eval_bootstrap_iters: int = 100000
    """Bootstrap resamples for the metrics' standard errors (0: skip them, much faster)."""

    eval_log_samples: bool = False
    """Also write the harness's per-sample files (samples_<task>_<time>.jsonl) beside the results."""
