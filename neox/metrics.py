"""Training metrics: the NeoX/Megatron console line, ``metrics.jsonl``, TensorBoard and W&B.

Only the rank that owns the writers (global rank 0, the last pipeline stage's loss having been
broadcast to it) calls ``log_train`` / ``log_eval``. Every train record carries the fields of
DESIGN.md §4; eval records carry ``"split"``. Config values whose names look like credentials are
never sent to W&B or printed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from neox.config import LoggingConfig

TRAIN_FIELDS = (
    "iteration", "lm_loss", "lr", "grad_norm", "loss_scale", "samples_per_sec", "tokens_per_sec",
    "tflops_per_gpu", "mfu", "consumed_samples", "consumed_tokens", "skipped_iterations",
    "nan_iterations", "max_memory_gib", "elapsed_ms_per_iteration",
)
SECRET_MARKERS = ("key", "token", "secret", "password", "credential")


def scrub_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with values of credential-like keys replaced by ``"***"``."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out[k] = scrub_secrets(v)
        elif any(m in k.lower() for m in SECRET_MARKERS) and v not in (None, "", False):
            out[k] = "***"
        else:
            out[k] = v
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    return format(value, spec)


def console_line(rec: dict[str, Any], train_iters: int | None) -> str:
    """The Megatron/NeoX-style one-line summary of a logged iteration."""
    parts = [
        f" iteration {rec['iteration']:8d}/{train_iters or 0:8d}",
        f"consumed samples: {rec['consumed_samples']:12d}",
        f"consumed tokens: {rec['consumed_tokens']:14d}",
        f"elapsed time per iteration (ms): {rec['elapsed_ms_per_iteration']:.1f}",
        f"learning rate: {rec['lr']:.3E}",
        f"lm_loss: {rec['lm_loss']:.6E}",
        f"loss scale: {_fmt(rec['loss_scale'], '.1f')}",
        f"grad norm: {_fmt(rec['grad_norm'], '.3f')}",
        f"number of skipped iterations: {rec['skipped_iterations']:3d}",
        f"number of nan iterations: {rec['nan_iterations']:3d}",
        f"samples/sec: {rec['samples_per_sec']:.3f}",
        f"tokens/sec: {rec['tokens_per_sec']:.1f}",
        f"TFLOPs/GPU: {rec['tflops_per_gpu']:.2f}",
        *([f"hardware TFLOPs/GPU (with recompute): {rec['hardware_tflops_per_gpu']:.2f}"]
          if rec.get("hardware_tflops_per_gpu", rec["tflops_per_gpu"]) != rec["tflops_per_gpu"] else []),
        f"MFU: {_fmt(rec['mfu'], '.3f')}",
        f"max memory (GiB): {_fmt(rec['max_memory_gib'], '.2f')}",
    ]
    timers = rec.get("timers_ms")
    if timers:
        parts.append("time (ms) " + " ".join(f"{k}: {v:.1f}" for k, v in timers.items()))
    return " | ".join(parts)


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN/Inf: a diverged loss is written as null with its text beside it.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def wants_wandb(cfg: LoggingConfig) -> bool:
    """``use_wandb``; null (GPT-NeoX's default) means on when a W&B key is found, as in GPT-NeoX."""
    if cfg.use_wandb is None:
        from neox.launcher import wandb_api_key

        return wandb_api_key(os.environ, cfg.wandb_host) is not None
    return cfg.use_wandb


class MetricsLogger:
    """Writes each record to the console, metrics.jsonl, TensorBoard and W&B (those enabled)."""

    def __init__(self, cfg: LoggingConfig, *, train_iters: int | None = None,
                 run_config: dict[str, Any] | None = None, enabled: bool = True) -> None:
        self.cfg = cfg
        self.train_iters = train_iters
        self.enabled = enabled
        self.jsonl_path = Path(cfg.log_dir) / "metrics.jsonl" if cfg.log_dir and enabled else None
        self._jsonl_warned = False
        self.tb = self._open_tensorboard() if enabled else None
        # GPT-NeoX's wandb_init_all_ranks: every rank starts its own run (same group); the other
        # writers stay on the rank that owns them.
        on_this_rank = enabled or cfg.wandb_init_all_ranks
        self.wandb = self._open_wandb(run_config or {}) if on_this_rank and wants_wandb(cfg) else None
        if self.jsonl_path is not None:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)

    def _open_tensorboard(self) -> Any:
        if not self.cfg.tensorboard_dir:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard_dir is set but tensorboard is not installed; not writing events", stacklevel=2)
            return None
        return SummaryWriter(log_dir=self.cfg.tensorboard_dir)

    def _open_wandb(self, run_config: dict[str, Any]) -> Any:
        try:
            import wandb
        except ImportError:
            warnings.warn("use_wandb is set but wandb is not installed; not logging to W&B", stacklevel=2)
            return None
        run_dir = self.cfg.log_dir or self.cfg.tensorboard_dir or "."
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        name = self.cfg.wandb_run_name
        if self.cfg.wandb_init_all_ranks and name:
            name = f"{name}-rank{_rank()}"
        try:
            return wandb.init(
                project=self.cfg.wandb_project, group=self.cfg.wandb_group, entity=self.cfg.wandb_team,
                name=name,
                dir=run_dir, config=scrub_secrets(run_config), reinit="finish_previous",
                settings=wandb.Settings(base_url=self.cfg.wandb_host, silent=True),
            )
        except Exception as err:  # noqa: BLE001 - a missing login must not stop training
            print(f"neox: warning: W&B disabled ({type(err).__name__}: {err}); set WANDB_API_KEY "
                  "or WANDB_MODE=offline", file=sys.stderr)
            return None

    def _write_jsonl(self, rec: dict[str, Any]) -> None:
        if self.jsonl_path is None:
            return
        clean = {k: _finite_or_none(v) for k, v in rec.items()}
        try:
            with open(self.jsonl_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(clean) + "\n")
        except OSError as err:  # a full or failing log disk must not end the run (checkpoints may still fit)
            if not self._jsonl_warned:
                print(f"neox: warning: cannot write {self.jsonl_path} ({err.strerror or err}); training goes on, "
                      "metrics on the console only until it can", file=sys.stderr)
            self._jsonl_warned = True

    def _write_scalars(self, prefix: str, rec: dict[str, Any], step: int) -> None:
        scalars = _scalars(prefix, rec)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def log_train(self, rec: dict[str, Any]) -> None:
        """Log one training iteration; ``rec`` has every name of ``TRAIN_FIELDS``."""
        if not self.enabled:
            if self.wandb is not None:  # wandb_init_all_ranks: this rank's own run
                self.wandb.log(_scalars("train", rec), step=rec["iteration"])
            return
        missing = [k for k in TRAIN_FIELDS if k not in rec]
        assert not missing, f"metrics record lacks {missing}"
        print(console_line(rec, self.train_iters), flush=True)
        self._write_jsonl(rec)
        self._write_scalars("train", rec, rec["iteration"])

    def log_eval(self, split: str, iteration: int, loss: float) -> None:
        """Log one evaluation (``split``: "validation" or "test") with its loss and perplexity."""
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 20.0)) if math.isfinite(loss) else float("nan")
        rec = {"split": split, "iteration": iteration, "lm_loss": loss, "lm_loss_ppl": ppl}
        print(f" {split} results at iteration {iteration} | lm_loss value: {loss:.6E} | "
              f"lm_loss_ppl value: {ppl:.6E}", flush=True)
        self._write_jsonl(rec)
        self._write_scalars(split, rec, iteration)

    def log_eval_metrics(self, split: str, iteration: int, metrics: dict[str, float]) -> None:
        """Log one evaluation's named metrics (lm-eval tasks: ``"<task>/<metric>"`` keys) as one record."""
        if not self.enabled:
            return
        rec = {"split": split, "iteration": iteration, **metrics}
        shown = " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items())
        print(f" {split} results at iteration {iteration} | {shown}", flush=True)
        self._write_jsonl(rec)
        self._write_scalars(split, rec, iteration)

    def close(self) -> None:
        """Flush and close the writers."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _scalars(prefix: str, rec: dict[str, Any]) -> dict[str, float]:
    """A record's numbers by W&B / TensorBoard name; the per-parameter norm tables under their own prefixes."""
    scalars = {f"{prefix}/{k}": float(v) for k, v in rec.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
    for k, v in (rec.get("timers_ms") or {}).items():
        scalars[f"timers/{k}_ms"] = float(v)
    for table, group in (("param_norms", "parameter_norms"), ("grad_norms", "gradient_norms")):
        for name, v in (rec.get(table) or {}).items():
            scalars[f"{group}/{name}"] = float(v)
    return scalars


def max_memory_gib(device_type: str) -> float:
    """Peak memory of this rank: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20 if os.name == "posix" else 0.0
