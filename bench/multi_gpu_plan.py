"""What bench/multi_gpu.py runs: the cases of issue 9 (two GPUs) and issue 12 (eight GPUs).

A case is one ``deepy.py train.py`` run: a config under configs/bench/ plus layout overrides. The
``--cpu-smoke`` form keeps every case's layout (TP, PP, DP, ZeRO stage, micro-batch, accumulation,
activation checkpointing, overlap_comm) and swaps the shape for configs/bench/cpu_smoke.yml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

P125M = "configs/bench/125M_parity.yml"
L7B = "configs/bench/llemma_7b_shape.yml"
TINY = "configs/bench/tinyllama_shape.yml"
L34B = "configs/bench/llemma_34b_24l.yml"
SMOKE = "configs/bench/cpu_smoke.yml"

GROUPS_2GPU = ("parity", "resume", "throughput", "breakdown", "anchor", "scaling")
GROUPS_8GPU = ("3d", "34b", "anchor8")
# Anchor shape: the Llemma-7B shape as fsdp2_anchor.py's flags (plain Llama of shared/bench/peers.py).
ANCHOR_SHAPE = ["--layers", "32", "--hidden", "4096", "--heads", "32", "--kv", "32", "--ffn", "11008",
                "--vocab", "32016", "--seq", "4096"]


@dataclass(frozen=True)
class Case:
    """One run. ``ref`` names the case whose loss curve this one must reproduce."""

    name: str
    group: str
    config: str
    gpus: int
    overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 20
    warmup: int = 5
    ref: str | None = None
    note: str = ""

    @property
    def tp(self) -> int:
        return int(self.overrides.get("model_parallel_size", 1))

    @property
    def pp(self) -> int:
        return int(self.overrides.get("pipe_parallel_size", 0))

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * max(self.pp, 1))

    @property
    def global_batch(self) -> int:
        o = self.overrides
        return int(o.get("train_micro_batch_size_per_gpu", 1)) * int(o.get("gradient_accumulation_steps", 1)) * self.dp

    def layout(self) -> str:
        o = self.overrides
        zero = (o.get("zero_optimization") or {}).get("stage", "cfg")
        parts = [f"TP{self.tp}", f"PP{self.pp}" if self.pp else "", f"DP{self.dp}", f"Z{zero}",
                 f"mbs{o.get('train_micro_batch_size_per_gpu', 1)}x{o.get('gradient_accumulation_steps', 1)}",
                 "AC" if o.get("checkpoint_activations") else "",
                 "noovl" if (o.get("zero_optimization") or {}).get("overlap_comm") is False else ""]
        return " ".join(p for p in parts if p)


def _lay(tp: int = 1, pp: int = 0, zero: int = 1, mbs: int = 1, gas: int = 1, ac: bool = False,
         overlap: bool | None = None, **extra: Any) -> dict[str, Any]:
    zero_cfg: dict[str, Any] = {"stage": zero}
    if overlap is not None:
        zero_cfg["overlap_comm"] = overlap
    return {"model_parallel_size": tp, "pipe_parallel_size": pp, "zero_optimization": zero_cfg,
            "train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": gas,
            "checkpoint_activations": ac, **extra}


def parity_cases(steps: int = 50) -> list[Case]:
    """125M, global batch 8 x 2048 in every layout; all against the 1-GPU curve."""
    ref = "parity/1gpu"
    c = lambda name, gpus, lay, note="": Case(f"parity/{name}", "parity", P125M, gpus, lay, steps, 0,  # noqa: E731
                                               None if name == "1gpu" else ref, note)
    return [
        c("1gpu", 1, _lay(mbs=8)),
        c("1gpu_gas2", 1, _lay(mbs=4, gas=2), "noise floor: same maths, other reduction order"),
        c("tp2", 2, _lay(tp=2, mbs=8)),
        c("pp2", 2, _lay(pp=2, mbs=8)),
        c("dp2_zero1", 2, _lay(zero=1, mbs=4)),
        c("dp2_zero3", 2, _lay(zero=3, mbs=4)),
    ]


def resume_cases(steps: int = 10) -> list[Case]:
    """Save at TP 2, reshard to TP 1, resume weights-only at TP 1 and (reference) at TP 2."""
    return [
        Case("resume/tp2_save", "resume", P125M, 2, _lay(tp=2, mbs=8), steps, 0),
        Case("resume/tp2_resume", "resume", P125M, 2, _lay(tp=2, mbs=8), steps, 0,
             note="weights-only load of the TP2 checkpoint"),
        Case("resume/tp1_resume", "resume", P125M, 1, _lay(tp=1, mbs=8), steps, 0, ref="resume/tp2_resume",
             note="weights-only load of the checkpoint resharded to TP1"),
    ]


def throughput_cases(steps: int = 20) -> list[Case]:
    """Llemma-7B shape on 2 GPUs: TP 2, ZeRO-1 and ZeRO-3 data parallel, checkpointing on/off, overlap on/off."""
    t = lambda name, lay, note="": Case(f"7b/{name}", "throughput", L7B, 2, lay, steps, 5, note=note)  # noqa: E731
    return [
        t("tp2", _lay(tp=2, mbs=1)),
        t("tp2_ac_mbs4", _lay(tp=2, mbs=4, ac=True)),
        t("zero1", _lay(zero=1, mbs=1)),
        t("zero1_ac_mbs2", _lay(zero=1, mbs=2, ac=True), "the anchor's checkpointed setting"),
        # bf16 weights + fp32 gradient accumulation at stage 1 runs DeepSpeed's BF16_Optimizer, which
        # reduces at the step boundary and ignores overlap_comm (deepspeed/runtime/engine.py,
        # _do_optimizer_sanity_check): the overlap pair uses bf16 accumulation, i.e. the ZeRO-1 optimizer.
        t("zero1_bf16acc", _lay(zero=1, mbs=1, data_types={"grad_accum_dtype": "bf16"}), "ZeRO-1 optimizer path"),
        t("zero1_bf16acc_nooverlap", _lay(zero=1, mbs=1, overlap=False, data_types={"grad_accum_dtype": "bf16"}),
          "overlap_comm off"),
        t("zero3", _lay(zero=3, mbs=1)),
        t("zero3_ac_mbs2", _lay(zero=3, mbs=2, ac=True)),
        t("zero3_nooverlap", _lay(zero=3, mbs=1, overlap=False), "overlap_comm off"),
    ]


def breakdown_cases(steps: int = 8) -> list[Case]:
    """Short runs with wall_clock_breakdown (synchronising timers), and a 1-GPU compute reference."""
    b = lambda name, gpus, lay, note="": Case(f"bd/{name}", "breakdown", L7B, gpus,  # noqa: E731
                                              {**lay, "wall_clock_breakdown": True}, steps, 3, note=note)
    return [
        b("compute_ref_1gpu_8l", 1, _lay(mbs=1, num_layers=8, attention_config=[[["flash"], 8]]),
          "compute reference: 8 layers, 1 GPU, no communication"),
        b("tp2", 2, _lay(tp=2, mbs=1)),
        b("zero1", 2, _lay(zero=1, mbs=1)),
        b("zero1_bf16acc", 2, _lay(zero=1, mbs=1, data_types={"grad_accum_dtype": "bf16"})),
        b("zero1_bf16acc_nooverlap", 2, _lay(zero=1, mbs=1, overlap=False, data_types={"grad_accum_dtype": "bf16"})),
        b("zero3", 2, _lay(zero=3, mbs=1)),
        b("zero3_nooverlap", 2, _lay(zero=3, mbs=1, overlap=False)),
    ]


def scaling_cases(steps: int = 30) -> list[Case]:
    s = lambda name, gpus: Case(f"tiny/{name}", "scaling", TINY, gpus, _lay(mbs=4), steps, 10)  # noqa: E731
    return [s("1gpu", 1), s("dp2", 2)]


def threed_cases(steps: int = 50) -> list[Case]:
    """Llemma-7B at TP2 x PP2 x DP2 and TP2 x DP4 (ZeRO-1), global batch 16, against 2 GPUs (TP2)."""
    ref = "3d/ref_2gpu_tp2"
    return [
        Case(ref, "3d", L7B, 2, _lay(tp=2, mbs=2, gas=8, ac=True), steps, 5,
             note="2-GPU reference, same global batch (16)"),
        Case("3d/tp2_pp2_dp2", "3d", L7B, 8, _lay(tp=2, pp=2, mbs=1, gas=8), steps, 5, ref=ref),
        Case("3d/tp2_dp4_zero1", "3d", L7B, 8, _lay(tp=2, zero=1, mbs=1, gas=4), steps, 5, ref=ref),
    ]


def big_cases(steps: int = 20) -> list[Case]:
    return [
        Case("34b/tp8", "34b", L34B, 8, _lay(tp=8, mbs=2), steps, 5),
        Case("34b/tp4_pp2", "34b", L34B, 8, _lay(tp=4, pp=2, mbs=1, gas=8), steps, 5),
    ]


def full_plan(gpus: int) -> list[Case]:
    """Every case that fits ``gpus`` GPUs (anchor runs are not cases: see multi_gpu.run_anchor)."""
    cases = []
    if gpus >= 2:
        cases += parity_cases() + resume_cases() + throughput_cases() + breakdown_cases() + scaling_cases()
    if gpus >= 8:
        cases += threed_cases() + big_cases()
    return cases


def default_groups(gpus: int) -> tuple[str, ...]:
    return GROUPS_8GPU if gpus >= 8 else GROUPS_2GPU


SMOKE_KEEP = {"data_types", "model_parallel_size", "pipe_parallel_size", "zero_optimization", "train_micro_batch_size_per_gpu",
              "gradient_accumulation_steps", "checkpoint_activations", "wall_clock_breakdown"}


def smoke_case(case: Case, steps: int) -> Case:
    """The same layout on the tiny fp32 CPU shape, ``steps`` iterations (fewer for throughput)."""
    keep = {k: v for k, v in case.overrides.items() if k in SMOKE_KEEP}
    checked = case.group in ("parity", "resume", "3d")
    n = steps if checked else max(3, steps // 2)
    return dataclasses.replace(case, config=SMOKE, overrides=keep, steps=n, warmup=min(case.warmup, 1))
