"""The DeepSpeed boundary: the only module that imports DeepSpeed or touches its engines' internals.

neox hands DeepSpeed a model, an optimizer, an LR schedule, the mpu and a config dict
(``neox.config.deepspeed`` derives it from the YAML keys); DeepSpeed owns data parallelism, ZeRO,
mixed precision, gradient accumulation, the pipeline schedule and the checkpoint files. Everything
else in neox talks to the :class:`Engine` this module returns, whose interface is typed and
DeepSpeed-free, so a DeepSpeed upgrade is checked against this one file (docs/internals.md).

Pipeline or not is decided here once: :func:`uses_pipeline` for the config (which model to build),
``Engine.is_pipeline`` for a built engine (which step, eval and checkpoint format apply).

Written against DeepSpeed 0.19.8 (pyproject pins ``deepspeed>=0.19.8,<0.20``): the private
attributes used below (``checkpoint_engine.save``, ``_config.load_universal_checkpoint``,
``enable_backward_allreduce``, the optimizer's loss-scale fields, the pipeline engine's
``_take_model_step`` and ``_INSTRUCTION_MAP``, the CPU accelerator's op builders and the shared-memory
buffer name) and the fp16 ZeRO-0 loss-scale workaround (``_fp16_zero0_optimizer``) are those of that
release.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from neox.config.parallel import ParallelConfig
from neox.training.grad_clip import uses_own_clipping

SUPPORTED_VERSIONS = ">=0.19.8,<0.20"
"""The DeepSpeed releases this module is written against (pyproject's ``train`` extra says the same)."""


def uses_pipeline(parallel: ParallelConfig) -> bool:
    """Whether this run trains a PipelineModule on DeepSpeed's pipeline engine (``pipe_parallel_size >= 1``,
    as GPT-NeoX: 1 is a one-stage pipeline) rather than a plain module."""
    return parallel.pipe_parallel_size >= 1


# ---------------------------------------------------------------------------------------------------
# process setup


def init_backend(backend: str, *, cpu: bool) -> None:
    """DeepSpeed's comm layer over the already initialised torch.distributed group.

    PipelineModule asks deepspeed.comm for ranks before ``deepspeed.initialize`` would set it up.
    """
    import deepspeed

    if cpu:
        use_cpu_accelerator_without_shm_op()
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def full_fp32_param(p: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 value of a parameter that ZeRO-3 partitions across ranks."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(p)


def full_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The reduced gradient of a parameter under any ZeRO stage (None before backward)."""
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(p)


def mpi_discovery(port: int) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT of this rank from MPI (``deepspeed_mpi``)."""
    from deepspeed.comm import mpi_discovery as discover

    discover(distributed_port=port, verbose=False)


def use_cpu_accelerator_without_shm_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce op (``deepspeed_shm_comm``).

    DeepSpeed 0.19's comm backend (TorchBackend) loads that op whenever the CPU accelerator offers it:
    a JIT compile of about 75 s on a machine's first CPU run (needing a C++ compiler and ninja at run
    time), then a 69 MB /dev/shm buffer per rank. The op serves only ``inference_all_reduce``
    (DeepSpeed inference's tensor-parallel layers), which neox never calls: its collectives are
    torch.distributed's. DeepSpeed asks the accelerator for the op's builder; this one has none.
    """
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    current = get_accelerator()
    if type(current) is not CPU_Accelerator:  # another accelerator, or already this one
        return

    class CPUAcceleratorWithoutShmOp(CPU_Accelerator):
        def create_op_builder(self, op_name: str) -> Any:
            return None if op_name == "ShareMemCommBuilder" else super().create_op_builder(op_name)

    replacement = CPUAcceleratorWithoutShmOp()
    replacement.max_mem = current.max_mem  # the peak-memory baseline DeepSpeed took at start
    set_accelerator(replacement)


def release_cpu_allreduce_buffer() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU shared-memory all-reduce.

    DeepSpeed creates ``deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}`` (69 MB) on every CPU
    rank and never unlinks it, so each CPU run left memory-backed files behind until /dev/shm was full.
    """
    from neox.config.deepspeed import CPU_ALLREDUCE_BUFFER, SHM_DIR

    name = CPU_ALLREDUCE_BUFFER.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                       port=os.environ.get("MASTER_PORT", ""), rank=os.environ.get("RANK", ""))
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(SHM_DIR, name))


def pipeline_topology(*, pipe: int, tensor: int, data: int) -> Any:
    """DeepSpeed's pipe-data-model topology, which a PipelineModule is built with."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=pipe, num_mp=tensor, num_dp=data)


# ---------------------------------------------------------------------------------------------------
# optimizers and the config dict


def installed_op(name: str) -> bool:
    """Whether DeepSpeed was installed with this compiled op (``fused_adam``, ``cpu_adam``)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get(name))


def deepspeed_adam(groups: list[dict[str, Any]], *, cpu: bool, lr: float, betas: tuple[float, ...],
                   eps: float) -> torch.optim.Optimizer:
    """DeepSpeed's compiled AdamW: DeepSpeedCPUAdam (``cpu``, for ZeRO offload) or FusedAdam."""
    if cpu:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        from neox.training.ds_ops import announce_build

        announce_build("cpu_adam", prebuilt=installed_op("cpu_adam"))  # the one line before DeepSpeed JIT-compiles it (if it must)
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)


def _offloads_optimizer(zero: dict[str, Any]) -> bool:
    return (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)


def runtime_config(config: dict[str, Any], optimizer: torch.optim.Optimizer, *, is_pipeline: bool) -> dict[str, Any]:
    """What ``deepspeed.initialize`` gets: the derived config (``args.deepspeed_config()``, which has no
    optimizer or scheduler block: neox builds both) adjusted to the optimizer object it is handed."""
    config = dict(config)
    zero = int((config.get("zero_optimization") or {}).get("stage", 0))
    if not is_pipeline and uses_own_clipping(zero, (config.get("fp16") or {}).get("enabled", False),
                                             (config.get("bf16") or {}).get("enabled", False)):
        config["gradient_clipping"] = 0.0  # train_step clips (foreach kernels, keeps the norm)
    if _offloads_optimizer(config.get("zero_optimization") or {}) and type(optimizer).__name__ != "DeepSpeedCPUAdam":
        # Without DeepSpeed's compiled CPU Adam, offload runs torch AdamW on the CPU copy.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


# ---------------------------------------------------------------------------------------------------
# the engine


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any], *,
               lr_scheduler: Any = None, mpu: Any = None, skip_single_rank_allreduce: bool = False) -> Engine:
    """``deepspeed.initialize`` on a plain module or a PipelineModule (then the pipeline engine, which
    uses its own grid: ``mpu`` is ignored), wrapped as an :class:`Engine`.

    ``skip_single_rank_allreduce``: on a plain ZeRO-0 engine with one data-parallel rank, switch off
    DeepSpeed's gradient all-reduce, which has nothing to reduce but still copies every gradient
    through its buckets (measured ~14 ms a step at 1.1B on an H100).
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule

    is_pipeline = isinstance(model, PipelineModule)
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config,
                                       mpu=None if is_pipeline else mpu, dist_init_required=False)
    engine = Engine(ds, is_pipeline=is_pipeline)
    if engine.loss_needs_fp16_scaling() and is_pipeline:
        _scale_pipeline_loss(ds, engine.scale_fp16_loss)
    if skip_single_rank_allreduce and not is_pipeline and not ds.zero_optimization():
        engine.skip_gradient_allreduce()
    return engine


def _fp16_zero0_optimizer(ds: Any) -> bool:
    """Whether DeepSpeed stepped fp16 through its ZeRO-0 wrappers (FP16_Optimizer, FP16_UnfusedOptimizer),
    whose loss DeepSpeed 0.19's ``engine.backward`` leaves unscaled.

    That ``backward`` multiplies the loss by the loss scale only for ZeRO optimizers and torch-autocast's
    grad scaler, yet those two wrappers' ``step`` divides the gradients by the scale all the same (and
    checks them for overflow): every update ends up ``loss_scale`` times too small, the clipping threshold
    is never reached, and fp16 gradients that need the scale underflow. Measured on an H200: the captured
    gradient norms of a one-stage pipeline at ZeRO 0 were exactly 1/4096 of the fp32 run's
    (tests/gpu/test_norms_pipe_gpu.py). Upstream: deepspeedai/DeepSpeed pull request 8393 (open).
    """
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    opt = ds.optimizer
    return (bool(ds.fp16_enabled()) and not isinstance(opt, ZeROOptimizer)
            and getattr(ds, "torch_autocast_z0_gradscaler", None) is None
            and getattr(opt, "loss_scale_config", None) is not None)


def _scale_pipeline_loss(ds: Any, scale: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """The pipeline engine's last stage calls the base engine's ``backward`` on ``self.loss`` from its
    BackwardPass instruction; scale that loss for the call (earlier stages receive scaled gradients).
    The instruction table is looked up on the instance, so one entry is replaced there; the loss the
    engine reports was summed in the forward pass and is left as it is."""
    from deepspeed.runtime.pipe import schedule

    original = type(ds)._INSTRUCTION_MAP[schedule.BackwardPass]

    def backward_pass(self: Any, buffer_id: int) -> None:
        if not self.is_last_stage():
            return original(self, buffer_id)
        loss = self.loss
        self.loss = scale(loss)
        try:
            return original(self, buffer_id)
        finally:
            self.loss = loss

    ds._INSTRUCTION_MAP = {**type(ds)._INSTRUCTION_MAP, schedule.BackwardPass: backward_pass}


class Engine:
    """A DeepSpeed engine (plain or pipeline) behind the calls neox makes on it.

    The training calls keep DeepSpeed's names (``backward``, ``step``, ``train_batch``, ...), so the
    step and loop read as DeepSpeed's documentation does; what reaches past DeepSpeed's public
    methods is a method here with a reason.
    """

    s3_uploader: Any = None
    """The run's S3 uploader (``neox.checkpoint``), kept here because the engine lives as long as the run."""

    def __init__(self, ds_engine: Any, *, is_pipeline: bool) -> None:
        self._ds = ds_engine
        self.is_pipeline = is_pipeline
        self._scale_fp16_loss = _fp16_zero0_optimizer(ds_engine)
        self._step_loss_scale = 1.0
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        self._norm_keeps_scale = self._scale_fp16_loss and isinstance(ds_engine.optimizer, FP16_UnfusedOptimizer)

    # training and evaluation -----------------------------------------------------------------------
    def __call__(self, *inputs: Any) -> Any:
        return self._ds(*inputs)

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(self.scale_fp16_loss(loss) if self._scale_fp16_loss else loss)

    def loss_needs_fp16_scaling(self) -> bool:
        """fp16 at ZeRO 0: DeepSpeed's backward leaves the loss unscaled, so neox scales it."""
        return self._scale_fp16_loss

    def scale_fp16_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """What FP16_Optimizer.backward does (see _fp16_zero0_optimizer); the scale is kept for the norm."""
        self._step_loss_scale = self.loss_scale()
        return loss.float() * self._step_loss_scale

    def step(self) -> None:
        self._ds.step()

    def train_batch(self, data_iter: Iterator) -> torch.Tensor:
        """One optimizer step on the pipeline engine (its schedule pulls the micro-batches)."""
        return self._ds.train_batch(data_iter)

    def eval_batch(self, data_iter: Iterator) -> torch.Tensor:
        """The pipeline engine's loss over one global batch (already averaged over data-parallel ranks)."""
        return self._ds.eval_batch(data_iter)

    def is_gradient_accumulation_boundary(self) -> bool:
        return bool(self._ds.is_gradient_accumulation_boundary())

    def gradient_accumulation_steps(self) -> int:
        return int(self._ds.gradient_accumulation_steps())

    def train_batch_size(self) -> int:
        return int(self._ds.train_batch_size())

    def was_step_applied(self) -> bool:
        return bool(self._ds.was_step_applied())

    def get_global_grad_norm(self) -> torch.Tensor | float | None:
        """The last step's gradient norm, unscaled. FP16_UnfusedOptimizer (ZeRO 0 fp16 with an optimizer
        DeepSpeed does not fuse) keeps the norm of the scaled gradients where its fused sibling divides
        by the loss scale; the scale to divide by is the one the step's backward used (the step may
        have raised it since)."""
        norm = self._ds.get_global_grad_norm()
        return norm / self._step_loss_scale if norm is not None and self._norm_keeps_scale else norm

    def get_lr(self) -> list[float]:
        return self._ds.get_lr()

    def before_pipeline_step(self, hook: Callable[[], None] | None) -> None:
        """Call ``hook`` inside every ``train_batch`` right before the optimizer step (None: stop).

        The pipeline engine's schedule ends with ReduceTiedGrads, ReduceGrads, OptimizerStep; its
        OptimizerStep calls ``_take_model_step``, which clips and steps. Wrapping that on this instance
        puts the hook where the plain step's ``backward`` has returned at the accumulation boundary: the
        gradients summed over the micro-batches, reduced over data-parallel ranks (and tied weights over
        stages), not yet clipped, and still multiplied by fp16's loss scale. A torch step pre-hook on
        our optimizer would run too late: inside DeepSpeed's fp16 / ZeRO wrappers, after unscaling and
        clipping, on flat partitions.
        """
        if not self.is_pipeline:
            raise ValueError("before_pipeline_step: a plain engine's step is neox's own (train_step captures there)")
        ds = self._ds
        if "_take_model_step" in vars(ds):
            del ds._take_model_step  # drop an earlier hook: one at a time
        if hook is None:
            return
        original = ds._take_model_step  # the class's bound method

        def take_model_step(*args: Any, **kwargs: Any) -> Any:
            hook()
            return original(*args, **kwargs)

        ds._take_model_step = take_model_step  # an instance attribute shadowing the method

    def skip_gradient_allreduce(self) -> None:
        """Stop DeepSpeed all-reducing gradients after backward (one rank, or an optimizer that reduces itself)."""
        self._ds.enable_backward_allreduce = False

    # state ---------------------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self._ds.module

    @property
    def optimizer(self) -> Any:
        """The optimizer DeepSpeed steps: ours, or its ZeRO / bf16 / fp16 wrapper around ours."""
        return self._ds.optimizer

    @property
    def lr_scheduler(self) -> Any:
        return self._ds.lr_scheduler

    @property
    def global_steps(self) -> int:
        return int(getattr(self._ds, "global_steps", 0))

    def fp16_enabled(self) -> bool:
        return bool(self._ds.fp16_enabled())

    def bfloat16_enabled(self) -> bool:
        return bool(self._ds.bfloat16_enabled())

    def zero_optimization_stage(self) -> int:
        return int(self._ds.zero_optimization_stage())

    def loss_scale(self) -> float:
        """The fp16 loss scale (1.0 without fp16)."""
        if not self.fp16_enabled():
            return 1.0
        opt = self._ds.optimizer
        cfg = getattr(opt, "loss_scale_config", None)
        return float(cfg.cur_scale if cfg is not None else getattr(opt, "cur_scale", 1.0))

    @property
    def tensor_parallel_size(self) -> int:
        # a pipeline engine's mp_world_size counts pipeline x tensor ranks; its grid knows the tensor size
        if self.is_pipeline:
            return int(self._ds.grid.get_slice_parallel_world_size() or 1)
        return int(getattr(self._ds, "mp_world_size", 1) or 1)

    def layout(self, world_size: int) -> dict[str, int]:
        """World, data-, tensor- and pipeline-parallel sizes and ZeRO stage, as a checkpoint manifest records them."""
        ds = self._ds
        return {
            "world_size": world_size,
            "data_parallel_size": int(getattr(ds, "seq_dp_world_size", getattr(ds, "dp_world_size", 1))),
            "model_parallel_size": int(getattr(ds, "mp_world_size", 1)),
            "pipe_parallel_size": int(getattr(ds, "num_stages", 1)),
            "zero_stage": self.zero_optimization_stage(),
        }

    # checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any]) -> list[str] | None:
        """DeepSpeed's save of this rank's files into ``{save_dir}/{tag}`` (no ``latest``); returns the
        paths written, for fsync (None: DeepSpeed's checkpoint engine could not be observed)."""
        with _recording_writes(self._ds) as written:
            self._ds.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
        return written

    def load_checkpoint(self, load_dir: str, tag: str, **options: Any) -> tuple[str | None, dict[str, Any] | None]:
        """DeepSpeed's ``load_checkpoint`` (options: load_module_only, load_optimizer_states,
        load_lr_scheduler_states); returns (path loaded or None, client state)."""
        return self._ds.load_checkpoint(load_dir, tag=tag, **options)

    @staticmethod
    def universal_conversion_command(tag_dir: str, out_dir: str) -> list[str]:
        """DeepSpeed's converter of a ZeRO checkpoint to its universal (resharding) format."""
        return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag_dir,
                "--output_folder", out_dir, "--inject_missing_state", "--num_extract_workers", "2",
                "--num_merge_workers", "2"]

    def load_universal_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, dict[str, Any] | None]:
        """Load a tag converted by ``universal_conversion_command`` (resharded ZeRO optimizer state)."""
        config = self._ds._config  # DeepSpeed reads the switch from its config at load time
        config.load_universal_checkpoint = True
        try:
            return self.load_checkpoint(load_dir, tag)
        finally:
            config.load_universal_checkpoint = False

    def restore_counters(self, client: dict[str, Any]) -> None:
        """Step and sample counters from a weights-only load's client state (the optimizer starts fresh)."""
        for key in ("global_steps", "global_samples", "skipped_steps"):
            if key in client:
                setattr(self._ds, key, client[key])


@contextlib.contextmanager
def _recording_writes(ds: Any) -> Iterator[list[str] | None]:
    """Record the paths this rank's DeepSpeed checkpoint engine writes (None: cannot tell)."""
    ce = getattr(ds, "checkpoint_engine", None)
    if ce is None or not callable(getattr(ce, "save", None)):
        yield None
        return
    written: list[str] = []
    original = ce.save

    def save(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        written.append(kwargs.get("path", args[1] if len(args) > 1 else None))
        return result

    ce.save = save  # an instance attribute shadowing the method, removed below
    try:
        yield written
    finally:
        del ce.save

