"""torch.profiler over a window of training iterations (the ``profile`` keys).

NeoX's ``profile`` brackets iterations with cudaProfilerStart/Stop for an external nsys run; here the
same keys drive torch.profiler, so a profile needs nothing but the run itself. What it writes under
``<log_dir>/profile/``, per rank:

- ``trace_rank{r}.json.gz``: the Chrome / Perfetto trace;
- ``kernels_rank{r}.txt``: the operator table sorted by self device time;
- ``summary_rank{r}.json``: device time per iteration split into kernel classes (GEMM, attention,
  compiled/Triton, optimizer, copies, communication, other) and the share of the window the GPU sat idle.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

# Kernel name fragments -> class; first match wins (checked in order, lower-case).
KERNEL_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("communication", ("nccl", "allreduce", "all_reduce", "allgather", "reducescatter")),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "lpnorm")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "sm90_", "sm80_")),
    ("compiled", ("triton",)),
    ("copy", ("memcpy", "memset", "copy", "cast", "fill")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, fragments in KERNEL_CLASSES:
        if any(f in low for f in fragments):
            return cls
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def largest_gaps(kernels: list[tuple[str, float, float]], cpu_ops: list[tuple[str, float, float]],
                 top: int = 5, min_us: float = 100.0) -> list[dict[str, Any]]:
    """The longest stretches with no kernel running, each with the host ops that ran during it
    (by start time): what the GPU was waiting for."""
    gaps, end = [], None
    for name, start, stop in sorted(kernels, key=lambda k: k[1]):
        if end is not None and start - end >= min_us:
            gaps.append((start - end, end, start, name))
        end = stop if end is None else max(end, stop)
    out = []
    for length, a, b, next_kernel in sorted(gaps, reverse=True)[:top]:
        host = sorted((s, n) for n, s, e in cpu_ops if s < b and e > a)
        out.append({"idle_ms": round(length / 1000, 3), "next_kernel": next_kernel[:80],
                    "host_ops": [n[:60] for _, n in (host if len(host) <= 10 else host[:3] + host[-7:])]})
    return out


def summarize(kernels: list[tuple[str, float, float]], iterations: int) -> dict[str, Any]:
    """Per-iteration ms per kernel class and idle share from (name, start_us, end_us) kernel records."""
    if not kernels:
        return {"iterations": iterations, "kernels": 0}
    per_class: dict[str, float] = {}
    for name, start, end in kernels:
        cls = kernel_class(name)
        per_class[cls] = per_class.get(cls, 0.0) + (end - start)
    window = max(e for _, _, e in kernels) - min(s for _, s, _ in kernels)
    busy = _union_us([(s, e) for _, s, e in kernels])
    n = max(iterations, 1)
    return {
        "iterations": iterations, "kernels": len(kernels),
        "window_ms_per_iter": round(window / 1000 / n, 3), "busy_ms_per_iter": round(busy / 1000 / n, 3),
        "idle_fraction": round(1 - busy / window, 4) if window > 0 else 0.0,
        "ms_per_iter": {k: round(v / 1000 / n, 3) for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])},
    }


class IterationProfiler:
    """Starts torch.profiler before iteration ``start`` and writes its outputs after ``stop - 1``."""

    def __init__(self, enabled: bool, start: int, stop: int, out_dir: str | Path | None, rank: int = 0) -> None:
        self.enabled, self.start, self.stop = enabled and out_dir is not None, start, stop
        self.out_dir, self.rank = Path(out_dir or "."), rank
        self._prof: Any = None
        if enabled and out_dir is None:
            logging.getLogger(__name__).warning("profile: no log_dir to write the profile to; not profiling")

    def before(self, iteration: int) -> None:
        """Call before running iteration ``iteration`` (0-based count of finished iterations)."""
        if not self.enabled or self._prof is not None or iteration != self.start:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()

    def after(self, iteration: int, device: torch.device) -> None:
        """Call after iteration ``iteration`` finished; stops and writes at ``stop - 1``."""
        if self._prof is None or iteration != self.stop - 1:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self._write(prof, self.stop - self.start)

    def _write(self, prof: Any, iterations: int) -> None:
        out = self.out_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        r = self.rank
        prof.export_chrome_trace(str(out / f"trace_rank{r}.json.gz"))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (out / f"kernels_rank{r}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=110))
        kernels, cpu_ops = [], []
        for e in prof.events():
            record, kind = (e.name, e.time_range.start, e.time_range.end), str(getattr(e, "device_type", ""))
            if kind.endswith("CPU"):
                cpu_ops.append(record)
            # Device-side records only; user annotations (``Optimizer.step#AdamW.step``) span kernels
            # already counted and would count them twice.
            elif kind.endswith("CUDA") and not getattr(e, "is_user_annotation", False) and record[2] > record[1]:
                kernels.append(record)
        summary = summarize(kernels, iterations)
        summary["largest_gaps"] = largest_gaps(kernels, cpu_ops)
        (out / f"summary_rank{r}.json").write_text(json.dumps(summary, indent=1) + "\n")
        logging.getLogger(__name__).info("profile of iterations [%d, %d) written to %s: %s",
                                         self.start, self.stop, out, json.dumps(summary))
