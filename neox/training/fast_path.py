"""The fast-path choices a rank makes where the config leaves them to neox (``neox.config.fast_path``).

Settled once per rank, before the model is built, on what only the rank knows: whether it sees CUDA
(``torch_compile`` unset compiles there) and which checkpoint it resumes (a run saved by DeepSpeed's
bf16 optimizer keeps that path, so its optimizer state resumes exactly). The returned config has
both keys set to the answers, so every later reader, and the config saved with each checkpoint,
sees what ran.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from neox.config import NeoXArgs
from neox.config import fast_path as plan

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def inductor_cache_dir(args: NeoXArgs) -> str | None:
    """Where Inductor's FX-graph / AOTAutograd / autotuning caches go: the user's
    ``TORCHINDUCTOR_CACHE_DIR``, else ``{save}/.cache/torchinductor`` for a local ``save`` (a requeued
    job on another node finds them there), else None (PyTorch's default, /tmp/torchinductor_$USER)."""
    if os.environ.get(INDUCTOR_CACHE_ENV):
        return os.environ[INDUCTOR_CACHE_ENV]
    save = args.checkpoint.save
    if save and "://" not in save:
        return os.path.join(os.path.abspath(save), ".cache", "torchinductor")
    return None


def _saved_flat(load: str) -> dict | None:
    """The config saved with the checkpoint ``load`` names (a save dir with ``latest``, or a tag dir)."""
    from neox.checkpoint import local

    resolved = local.resolve(load)
    if resolved is None:
        return None
    path = os.path.join(*resolved, local.ARGS_NAME)
    if not os.path.isfile(path):
        return {}  # written by GPT-NeoX or DeepSpeed directly: DeepSpeed's optimizers
    with open(path) as f:
        return json.load(f)


def resumes_deepspeed_bf16(args: NeoXArgs, load: str | None) -> bool:
    """True when ``load`` holds optimizer state saved by DeepSpeed's bf16 optimizer that this run
    would load (not ``finetune`` / ``no_load_optim``; S3 checkpoints are not looked at here)."""
    ck = args.checkpoint
    if not load or "://" in load or ck.finetune or ck.no_load_optim:
        return False
    saved = _saved_flat(load)
    if saved is None:
        return False
    return saved.get("optimizer_master_weights") is not True and saved.get("precision", "bfloat16") == "bfloat16"


def resolve_on_rank(args: NeoXArgs, device: torch.device, load: str | None) -> tuple[NeoXArgs, list[str]]:
    """``args`` with ``torch_compile`` and ``optimizer_master_weights`` decided; the log lines saying so."""
    notes = []
    compile_on, why = plan.compile_for(args.model.torch_compile, device.type == "cuda")
    if compile_on:
        cache = inductor_cache_dir(args)
        if cache and not os.environ.get(INDUCTOR_CACHE_ENV):
            os.environ[INDUCTOR_CACHE_ENV] = cache
        why += f"; Inductor cache {cache or 'PyTorch default (/tmp/torchinductor_$USER)'}"
    notes.append(f"torch.compile {'on' if compile_on else 'off'} ({why})")
    choice = plan.master_weights_choice(args)
    if choice.auto and choice.enabled and resumes_deepspeed_bf16(args, load):
        choice = plan.MasterChoice(False, True, f"resuming {load}, saved by DeepSpeed's bf16 optimizer: its optimizer "
                                                "state resumes exactly on that path; a new run takes the fast path")
    notes.append(plan.master_message(choice, args))
    optim = args.optim
    stage = int(optim.zero_optimization.get("stage", 0))
    if not choice.enabled and stage == 0 and plan.deepspeed_refuses_stage0(args):
        # derive kept stage 0 for neox's optimizer; DeepSpeed's bf16 optimizer needs stage 1 here
        optim = dataclasses.replace(optim, zero_optimization={**optim.zero_optimization, "stage": 1})
        notes.append("zero_optimization.stage 0 -> 1: DeepSpeed refuses bf16 with grad_accum_dtype fp32 at stage 0")
    args = dataclasses.replace(
        args, optim=optim, model=dataclasses.replace(args.model, torch_compile=compile_on),
        precision=dataclasses.replace(args.precision, optimizer_master_weights=choice.enabled))
    return args, notes


def compile_counts() -> tuple[int, int]:
    """Inductor's FX-graph cache (hits, misses) in this process so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def compile_summary(seconds: float, since: tuple[int, int] = (0, 0)) -> str:
    """One line on the first step of a compiled run: its time and whether Inductor's caches served
    it (counted from ``since``, ``compile_counts()`` before the step)."""
    hits, misses = (now - before for now, before in zip(compile_counts(), since))
    kind = "warm" if hits and not misses else "cold" if misses and not hits else "partly warm"
    return (f"first step {seconds:.1f} s with torch.compile ({kind}: {hits} compiled graphs from Inductor's cache, "
            f"{misses} compiled anew; cache {os.environ.get(INDUCTOR_CACHE_ENV) or 'PyTorch default'})")


class FirstStepTimer:
    """Logs ``compile_summary`` once, after the first step of a run that compiles (CUDA ranks)."""

    def __init__(self, compile_on: bool | None, device: torch.device, rank: int) -> None:
        self.active, self.device, self.rank = bool(compile_on) and device.type == "cuda", device, rank
        self.since = compile_counts() if self.active else (0, 0)  # the process may have compiled before
        self.started = time.perf_counter()

    def done(self) -> None:
        if not self.active:
            return
        self.active = False
        torch.cuda.synchronize(self.device)
        if self.rank == 0:
            print(f"neox: {compile_summary(time.perf_counter() - self.started, self.since)}", flush=True)
