"""Stop requests: the kill-switch file and SIGTERM / SIGUSR1, checked at iteration boundaries.

A signal handler only records the request; the loop polls ``should_stop`` after each iteration, all
ranks agree on it through one all-reduce, and the run saves a checkpoint and exits cleanly. With
several ranks the all-reduced flag is read one poll later (``PendingScalars``), so agreeing costs
no GPU drain per step; every rank reads the same flag at the same poll, so all stop together.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
import torch.distributed as dist

from neox.training.readback import PendingScalars


class StopRequests:
    """Collects stop requests from signals and the kill-switch file."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, kill_switch_path: str | None = None) -> None:
        self.kill_switch_path = kill_switch_path
        self.signal_received: int | None = None
        self._previous: dict[int, Any] = {}
        self._pending: tuple[PendingScalars, str | None] | None = None

    def install(self) -> None:
        """Record SIGTERM / SIGUSR1 instead of dying (main thread only; elsewhere a no-op)."""
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal_received = signum

    def local_reason(self) -> str | None:
        """Why this rank wants to stop, or None."""
        if self.signal_received is not None:
            return f"signal {signal.Signals(self.signal_received).name}"
        if self.kill_switch_path and os.path.exists(self.kill_switch_path):
            return f"kill switch {self.kill_switch_path}"
        return None

    def should_stop(self, device: torch.device) -> str | None:
        """The stop reason if any rank has one (a collective: every rank must call it each time).

        On several ranks the answer covers the requests seen up to the previous call: this call's
        all-reduce is read at the next one.
        """
        reason = self.local_reason()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return reason
        flag = torch.tensor([1.0 if reason else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        previous, self._pending = self._pending, (PendingScalars(flag=flag), reason)
        if previous is None or not previous[0].get()["flag"]:
            return None
        return previous[1] or reason or "stop requested on another rank"
