"""``pretrain(args)``: wiring only — process groups, seeds, tokenizer, model, engine, data, loop."""

from __future__ import annotations

import atexit
import dataclasses
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_core import parallel_state
from neox.checkpoint.state import TrainState
from neox.config import NeoXArgs
from neox.config.run import inference_load_dir
from neox.metrics import MetricsLogger
from neox.training import engine as boundary
from neox.training import flops
from neox.training.engine import Engine
from neox.training.eval import fixed_batch_loss_fn
from neox.training.loop import TrainContext, train
from neox.training.lr_schedule import AnnealingLR, resolve_schedule
from neox.training.optim import base_lr, build_optimizer
from neox.training.preemption import StopRequests


@dataclass
class TrainResult:
    """What a finished (or stopped) run returns: its final state and why it stopped early (None: it did not).

    Losses are not kept: each logged iteration's is in ``{log_dir}/metrics.jsonl``."""

    state: TrainState
    stop_reason: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(args: NeoXArgs) -> torch.device:
    """torch.distributed (NCCL on GPU, gloo on CPU) and the tensor/pipeline/data groups; the device."""
    if args.launcher.deepspeed_mpi and not dist.is_initialized():
        discover_mpi(args)
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # `python train.py` without a launcher: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(shutdown)  # released before interpreter teardown, see shutdown()
    boundary.init_backend(dist.get_backend(), cpu=not use_cuda)
    if not parallel_state.is_initialized():
        parallel_state.initialize_model_parallel(args.parallel.model_parallel_size,
                                                 max(args.parallel.pipe_parallel_size, 1))
    return device


def discover_mpi(args: NeoXArgs) -> None:
    """``deepspeed_mpi``, as GPT-NeoX's configure_distributed_args: this rank's RANK, WORLD_SIZE, LOCAL_RANK
    and MASTER_ADDR/PORT from MPI (mpirun, no DeepSpeed runner), through DeepSpeed's ``mpi_discovery``."""
    from neox.errors import ConfigError

    try:
        import mpi4py  # noqa: F401  (mpi_discovery imports it)
    except ImportError:
        raise ConfigError("deepspeed_mpi: reading the ranks from MPI needs mpi4py (pip install mpi4py)") from None
    from neox.handoff import DEFAULT_PORT

    # GPT-NeoX's default port where the config leaves it free (every MPI rank must agree on it)
    boundary.mpi_discovery(args.launcher.master_port or DEFAULT_PORT)
    world = args.parallel.world_size
    if world is not None and int(os.environ["WORLD_SIZE"]) != world:
        raise ConfigError(f"deepspeed_mpi: MPI reports {os.environ['WORLD_SIZE']} ranks but the config was resolved "
                          f"for world_size {world} (num_gpus * num_nodes)")


def shutdown() -> None:
    """Release the process groups before the interpreter exits.

    Left to interpreter teardown, gloo's threads sometimes abort the process after a finished run
    ("terminate called without an active exception", exit -6): about 1 CPU run in 10 with 2 ranks.
    """
    if parallel_state.is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    boundary.release_cpu_allreduce_buffer()


def set_seeds(seed: int) -> None:
    """Python, NumPy and torch RNGs, plus the tensor-parallel stream (differs per tensor rank)."""
    random.seed(seed)
    np.random.seed(seed)
    from megatron_core.tensor_parallel.random import model_parallel_manual_seed

    model_parallel_manual_seed(seed)


def build_model(args: NeoXArgs, device: torch.device) -> torch.nn.Module:
    """GPTModel for pipe_parallel_size 0, else a GPTModelPipe (a DeepSpeed PipelineModule); FP8 block
    linears when the precision section asks for them, then per-block compile."""
    from neox.model.fp8 import convert_block_linears

    seed, sp = args.training.seed, args.parallel.sequence_parallel
    if not boundary.uses_pipeline(args.parallel):
        from neox.model import GPTModel

        model = GPTModel(args.model, sequence_parallel=sp, seed=seed, device=device)
    else:
        from neox.model.pipe import GPTModelPipe

        topo = boundary.pipeline_topology(pipe=parallel_state.get_pipeline_model_parallel_world_size(),
                                        tensor=parallel_state.get_tensor_model_parallel_world_size(),
                                        data=parallel_state.get_data_parallel_world_size())
        model = GPTModelPipe(args.model, topology=topo, sequence_parallel=sp, seed=seed,
                             partition_method=args.parallel.pipe_partition_method)
    convert_block_linears(model, args.precision, device)
    return compile_blocks(model, args, device)


# The torch config module each compile setting lives in.
_COMPILE_CONFIGS = {"coordinate_descent_tuning": "torch._inductor.config",
                    "activation_memory_budget": "torch._functorch.config"}


def compile_options(args: NeoXArgs) -> dict[str, Any]:
    """torch.compile settings for this run's compiles, by their torch names (``torch_compile_tuning``,
    ``torch_compile_memory_budget``); PyTorch's defaults are left out."""
    m = args.model
    options: dict[str, Any] = {}
    if m.torch_compile_tuning:
        options["coordinate_descent_tuning"] = True
    if m.torch_compile_memory_budget < 1.0:
        options["activation_memory_budget"] = float(m.torch_compile_memory_budget)
    return options


def _apply_compile_options(args: NeoXArgs) -> None:
    # Set on the process-wide configs, as TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 does. Passed as
    # torch.compile(options=...) tuning made nothing faster on an H100 (probably only the forward
    # graphs got it: backward graphs compile later); through the config it gave +1.5-2%.
    import importlib

    for key, value in compile_options(args).items():
        setattr(importlib.import_module(_COMPILE_CONFIGS[key]), key, value)


def compile_blocks(model: torch.nn.Module, args: NeoXArgs, device: torch.device) -> torch.nn.Module:
    """torch.compile each transformer block in place (``torch_compile``, GPU only; CPU runs stay eager)."""
    if args.model.torch_compile and device.type == "cuda":
        from neox.model.transformer import TransformerBlock

        _apply_compile_options(args)
        for module in model.modules():
            if isinstance(module, TransformerBlock):
                module.compile()
    return model


def training_loss_fn(args: NeoXArgs, device: torch.device, loss_fn: Any) -> Any:
    """The loss, compiled with ``torch_compile`` on a GPU at tensor-parallel size 1.

    Compiled, the fp32 upcast, log-softmax and target gather fuse into one pass over the bf16
    logits instead of materialising fp32 logits for the whole micro-batch.
    """
    if args.model.torch_compile and device.type == "cuda" and args.parallel.model_parallel_size == 1:
        _apply_compile_options(args)
        return torch.compile(loss_fn)
    return loss_fn


def build_engine(args: NeoXArgs, model: torch.nn.Module, device: torch.device) -> tuple[Engine, AnnealingLR]:
    """The DeepSpeed engine over our optimizer, schedule and mpu (``neox.training.engine``)."""
    optimizer = build_optimizer(model, args, device)
    schedule = resolve_schedule(args.lr, args.training.train_iters or 0, base_lr(args))
    scheduler = AnnealingLR(optimizer, schedule, override=args.lr.override_lr_scheduler,
                            use_checkpoint=args.lr.use_checkpoint_lr_scheduler)
    config = boundary.runtime_config(args.deepspeed_config(), optimizer, is_pipeline=boundary.uses_pipeline(args.parallel))
    engine = boundary.initialize(model, optimizer, config, lr_scheduler=scheduler, mpu=parallel_state,
                                 skip_single_rank_allreduce=parallel_state.get_data_parallel_world_size() == 1)
    if getattr(optimizer, "reduces_gradients", False):
        engine.skip_gradient_allreduce()  # MasterWeightAdamW accumulating in fp32 all-reduces its fp32 sums itself
    return engine, scheduler


def _device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _prepare(args: NeoXArgs) -> tuple[NeoXArgs, torch.device, Any]:
    from neox.config.validate import input_files_exist, precision_runs_here

    input_files_exist(args)  # before any process group, model or file is made
    device = init_distributed(args)
    precision_runs_here(args, 1 if device.type == "cuda" else 0)
    set_seeds(args.training.seed)
    from neox.tokenizer.build import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer)
    if args.model.padded_vocab_size is None:
        args = args.with_vocab_size(tokenizer.vocab_size)
    return args, device, tokenizer


def _validation_fn(engine: Engine, args: NeoXArgs, device: torch.device, loss_fn: Any) -> Any:
    if not args.checkpoint.checkpoint_validation_with_forward_pass:
        return None
    return fixed_batch_loss_fn(
        engine, vocab_size=args.model.padded_vocab_size, micro_batch=args.training.train_micro_batch_size_per_gpu,
        seq_length=args.model.seq_length, seed=args.training.seed, device=device, loss_fn=loss_fn)


def resume_from_save(args: NeoXArgs) -> NeoXArgs:
    """``load`` defaults to ``save`` when ``save`` already holds a checkpoint (a ``latest`` file).

    So a requeued or restarted job resumes with no edit to its config; an explicit ``load`` wins.
    The rule is ``inference_load_dir``'s, which generation uses too.
    """
    ckpt = args.checkpoint
    where = inference_load_dir(ckpt)
    if ckpt.load or where is None:
        return args
    return dataclasses.replace(args, checkpoint=dataclasses.replace(ckpt, load=where))


def _load(engine: Engine, args: NeoXArgs, validation_fn: Any) -> TrainState:
    if not args.checkpoint.load:
        return TrainState()
    from neox.checkpoint import load_checkpoint
    from neox.training.master_weights import adopt_masters

    state = load_checkpoint(engine, args.checkpoint, validation_fn=validation_fn) or TrainState()
    adopt_masters(engine.optimizer)  # a checkpoint saved with optimizer_master_weights, resumed without
    return state


def _iterators(args: NeoXArgs, state: TrainState) -> Any:
    from neox.data.builder import build_data_iterators

    t = args.training
    return build_data_iterators(
        args.data, seq_length=args.model.seq_length, seed=t.seed,
        micro_batch_size=t.train_micro_batch_size_per_gpu, global_batch_size=t.train_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
        train_iters=t.train_iters, eval_interval=t.eval_interval, eval_iters=t.eval_iters,
        consumed_train_samples=state.consumed_train_samples, consumed_valid_samples=state.consumed_valid_samples,
        vocab_size=args.model.padded_vocab_size,
    )


def _save_fn(engine: Engine, args: NeoXArgs, validation_fn: Any) -> Any:
    from neox.checkpoint import save_checkpoint

    flat = args.to_flat()  # stored next to the weights (secrets redacted)
    return lambda state, iteration: save_checkpoint(engine, args.checkpoint, state, iteration, args_flat=flat,
                                                    validation_fn=validation_fn)


def _summary(args: NeoXArgs, state: TrainState, secs: float, iters: int, tokens: int, reason: str | None) -> None:
    print(f"neox: trained {iters} iterations, {tokens} tokens in {secs:.1f} s "
          f"({tokens / max(secs, 1e-9):.0f} tokens/s incl. evaluation and checkpoints)", flush=True)
    if reason:
        saved = f"checkpoint in {args.checkpoint.save}" if args.checkpoint.save else "no save directory set"
        print(f"neox: stopped at iteration {state.iteration} ({reason}); {saved}", flush=True)


def _eval_tasks_fn(args: NeoXArgs, engine: Any, tokenizer: Any, logger: MetricsLogger) -> Any:
    if not args.eval.eval_tasks:
        return None
    from neox.eval.training import make_eval_tasks_fn

    return make_eval_tasks_fn(args, engine, tokenizer, logger)


def pretrain(args: NeoXArgs) -> TrainResult:
    """Train the model ``args`` describes; every rank calls this (train.py, or a test's spawned rank)."""
    from neox.checkpoint.rng import get_rng_state, set_rng_state

    args, device, tokenizer = _prepare(args)
    from neox.model.loss import lm_loss
    from neox.training.fast_path import resolve_on_rank

    args, notes = resolve_on_rank(args, device, resume_from_save(args).checkpoint.load)
    if dist.get_rank() == 0:
        print("\n".join(f"neox: {note}" for note in notes), flush=True)

    model = build_model(args, device)
    engine, _ = build_engine(args, model, device)
    validation_fn = _validation_fn(engine, args, device, lm_loss)
    resumed = resume_from_save(args)
    if resumed is not args and dist.get_rank() == 0:
        print(f"neox: resuming from {resumed.checkpoint.load} (load defaults to save when it holds a checkpoint)",
              flush=True)
    args = resumed
    state = _load(engine, args, validation_fn)
    # Training starts from these streams (the checkpoint's, on resume): what the setup below draws, such as
    # each DataLoader iterator's base seed from torch's generator, must not shift the first step's dropout.
    start_rng = get_rng_state()
    iters = _iterators(args, state)
    rank0 = dist.get_rank() == 0
    logger = MetricsLogger(args.logging, train_iters=args.training.train_iters,
                           run_config=args.to_flat() if args.logging.use_wandb is not False else None, enabled=rank0)
    stop = StopRequests(args.training.kill_switch_path)
    stop.install()
    ctx = TrainContext(args=args, engine=engine, device=device, loss_fn=training_loss_fn(args, device, lm_loss),
                       eod=tokenizer.eod,
                       logger=logger, stop=stop, save_fn=_save_fn(engine, args, validation_fn) if args.checkpoint.save else None,
                       peak_tflops=flops.peak_tflops(_device_name(device), args.logging.peak_theoretical_tflops),
                       eval_tasks_fn=_eval_tasks_fn(args, engine, tokenizer, logger))
    if rank0:
        print(f"neox: {flops.non_embedding_params(args.model) / 1e6:.2f}M non-embedding parameters, "
              f"{flops.flops_per_token(args.model) / 1e6:.1f} MFLOPs per token, device {device}", flush=True)
    from neox.checkpoint import upload_missing, uploads_finished

    with uploads_finished(engine):  # every queued upload is part of the run, the last one included
        upload_missing(engine, args.checkpoint)  # what a killed run left un-uploaded
        start_iter, start_tokens, start = state.iteration, state.consumed_tokens, time.perf_counter()
        try:
            set_rng_state(start_rng)
            reason = train(ctx, state, iters.train, iters.valid, iters.test)
        finally:
            stop.uninstall()
            logger.close()
        if rank0:
            _summary(args, state, time.perf_counter() - start, state.iteration - start_iter,
                     state.consumed_tokens - start_tokens, reason)
    return TrainResult(state=state, stop_reason=reason)
