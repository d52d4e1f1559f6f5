"""Which training path a config gets when it leaves the choice to neox ("fast by default").

Pure functions of the config (and, for compilation, of whether CUDA is visible), so a CPU login node
resolves exactly what the GPU ranks will do: the dry run prints ``plan(args)``, the ranks act on the
same answers.

- ``torch_compile`` unset (None): compile where the rank sees CUDA, eager elsewhere (CPU ranks).
- ``optimizer_master_weights`` unset (None): ``precision: bfloat16`` without a pipeline engine, at
  ZeRO stage 0 (any data-parallel size: replicated masters are what stage 0 means) or at stage 1 with
  one data-parallel rank (stage 1 has nothing to partition there), takes neox's bf16-parameter /
  fp32-master optimizer instead of DeepSpeed's bf16 optimizer. At stage 1 with several data-parallel
  ranks DeepSpeed's ZeRO-1 stays: it partitions the fp32 masters and moments over the ranks, which
  replicated masters would multiply by the data-parallel size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neox.config.args import NeoXArgs

MASTER_OPTIMIZERS = ("adam", "adamw", "fusedadam")
FP32_ACCUM = ("fp32", "float32", "float", "torch.float32")
BF16_ACCUM = ("bf16", "bfloat16", "torch.bfloat16")
OPT_OUT = "set optimizer_master_weights: false to use DeepSpeed's bf16 optimizer"


@dataclass(frozen=True)
class MasterChoice:
    """The resolved ``optimizer_master_weights``: on or off, whether neox chose it, and why."""

    enabled: bool
    auto: bool
    reason: str


def offloads_optimizer(zero: dict[str, Any]) -> bool:
    if zero.get("cpu_offload"):
        return True
    return (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)


def master_weights_for(*, setting: bool | None, precision: str, zero: dict[str, Any], dp: int, pp: int,
                       optimizer_type: str, fp32_residual: bool) -> MasterChoice:
    """The choice from the raw values (also used by derive, before NeoXArgs exists)."""
    if setting is not None:
        why = "set in the config" if setting else "optimizer_master_weights: false in the config"
        return MasterChoice(bool(setting), False, why)
    stage = int(zero.get("stage", 0))
    blockers = [
        (precision != "bfloat16", f"precision {precision}"),
        (pp != 0, f"pipe_parallel_size {pp} (DeepSpeed's pipeline engine)"),
        (stage >= 2, f"ZeRO stage {stage}"),
        (stage == 1 and dp > 1, f"ZeRO stage 1 at data parallel {dp}: DeepSpeed partitions the fp32 masters over "
                                "the ranks (set optimizer_master_weights: true with zero stage 0 to replicate them)"),
        (offloads_optimizer(zero), "optimizer offload"),
        (optimizer_type.lower() not in MASTER_OPTIMIZERS, f"optimizer {optimizer_type}"),
        (fp32_residual, "fp32_residual_connection"),
    ]
    for blocked, why in blockers:
        if blocked:
            return MasterChoice(False, True, why)
    return MasterChoice(True, True, f"precision bfloat16, ZeRO stage {stage}, data parallel {dp}")


def master_weights_choice(a: NeoXArgs) -> MasterChoice:
    return master_weights_for(
        setting=a.precision.optimizer_master_weights, precision=a.precision.precision or "fp32",
        zero=a.optim.zero_optimization, dp=a.parallel.data_parallel_size or 1, pp=a.parallel.pipe_parallel_size,
        optimizer_type=str((a.optim.optimizer or {}).get("type", "AdamW")),
        fp32_residual=a.model.fp32_residual_connection)


def accumulates_in_fp32(a: NeoXArgs) -> bool:
    """With master weights and gradient accumulation: sum each micro-batch's bf16 gradients into fp32
    buffers (the default, and what grad_accum_dtype fp32 asks for), unless grad_accum_dtype is bf16."""
    accum = str((a.precision.data_types or {}).get("grad_accum_dtype", "fp32")).lower()
    return a.training.gradient_accumulation_steps > 1 and accum not in BF16_ACCUM


GEMM_ACCUMULATION_SWITCH = "NEOX_GEMM_GRAD_ACCUMULATION"
"""Set to 1: with master weights, bf16 accumulation and one process, linear layers add each
micro-batch's weight gradient into the running sum inside their GEMM. A switch for benchmarking it
against autograd's accumulation before it becomes the default (docs/performance.md)."""


def accumulates_in_gemm(a: NeoXArgs) -> bool:
    """The bf16 accumulation of ``master_message`` done inside the weight-gradient GEMMs."""
    return (os.environ.get(GEMM_ACCUMULATION_SWITCH) == "1" and master_weights_choice(a).enabled
            and a.training.gradient_accumulation_steps > 1 and not accumulates_in_fp32(a)
            and (a.parallel.data_parallel_size or 1) == 1)


def deepspeed_refuses_stage0(a: NeoXArgs) -> bool:
    """bf16 with fp32 gradient accumulation, which DeepSpeed 0.19.8 refuses at ZeRO stage 0."""
    accum = str((a.precision.data_types or {}).get("grad_accum_dtype", "")).lower()
    return a.precision.precision == "bfloat16" and accum in FP32_ACCUM


def skips_nonfinite(a: NeoXArgs) -> bool:
    """Replacing DeepSpeed's bf16 optimizer: skip a step whose gradients are not finite, as it does
    (its ``bf16.check_grad_overflow``, on by default)."""
    return a.precision.precision == "bfloat16" and bool(a.precision.bf16.get("check_grad_overflow", True))


def compile_for(setting: bool | None, cuda: bool) -> tuple[bool, str]:
    """``torch_compile`` on a rank that does (or does not) see CUDA."""
    if setting is None:
        return (True, "torch_compile unset: on where CUDA is visible; set torch_compile: false to run eager") if cuda \
            else (False, "torch_compile unset: eager without CUDA")
    if setting and not cuda:
        return False, "torch_compile: true, but no CUDA on this rank: eager"
    return bool(setting), "set in the config"


def master_message(choice: MasterChoice, a: NeoXArgs) -> str:
    """The one log line that says which optimizer path runs and why."""
    if choice.enabled:
        accum = ""
        if a.training.gradient_accumulation_steps > 1:
            accum = ", gradients accumulated in fp32" if accumulates_in_fp32(a) else ", gradients accumulated in bf16"
            if accumulates_in_gemm(a):
                accum += f" inside the weight-gradient GEMMs ({GEMM_ACCUMULATION_SWITCH}=1)"
        tail = f"{choice.reason}); {OPT_OUT}" if choice.auto else "optimizer_master_weights: true)"
        return f"bf16 parameters with fp32 master weights (fast path{accum}; {tail}"
    if a.precision.precision == "bfloat16":
        why = choice.reason if choice.auto else "optimizer_master_weights: false"
        return f"DeepSpeed's bf16 optimizer ({why})"
    return f"{a.precision.precision} parameters, {'torch AdamW' if choice.auto else choice.reason}"


def plan(a: NeoXArgs) -> dict[str, Any]:
    """What the ranks will do, for the dry run."""
    choice = master_weights_choice(a)
    on_gpu, gpu_why = compile_for(a.model.torch_compile, True)
    on_cpu, _ = compile_for(a.model.torch_compile, False)
    return {
        "optimizer_master_weights": choice.enabled,
        "optimizer_path": master_message(choice, a),
        "fp32_gradient_accumulation": choice.enabled and accumulates_in_fp32(a),
        "torch_compile_on_cuda_ranks": on_gpu,
        "torch_compile_on_cpu_ranks": on_cpu,
        "torch_compile": gpu_why,
    }


def deepspeed_overrides(a: NeoXArgs, config: dict[str, Any]) -> None:
    """With master weights, DeepSpeed runs a plain ZeRO-0 engine around neox's optimizer: bf16 is
    neox's (bf16 parameters, bf16 autocast), and accumulation is neox's (fp32 buffers)."""
    if not master_weights_choice(a).enabled:
        return
    config["zero_optimization"] = {"stage": 0}
    # neox accumulates (DeepSpeed 0.19.8 would refuse bf16 with fp32 accumulation at stage 0)
    config.pop("data_types", None)
    if a.precision.precision == "bfloat16":
        config["bf16"] = {"enabled": False}
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def plan_lines(a: NeoXArgs) -> list[str]:
    """``plan`` as the dry run prints it (stderr: stdout is one JSON object)."""
    p = plan(a)
    return [f"torch.compile: {'on' if p['torch_compile_on_cuda_ranks'] else 'off'} for CUDA ranks, "
            f"{'on' if p['torch_compile_on_cpu_ranks'] else 'off'} for CPU ranks ({p['torch_compile']})",
            p["optimizer_path"]]
