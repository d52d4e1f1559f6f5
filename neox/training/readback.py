"""Reading GPU scalars on the host without draining the GPU's queue."""

from __future__ import annotations

import torch


class PendingScalars:
    """Scalars of a step (loss, gradient norm, a stop flag), readable later without draining the GPU queue.

    ``.item()`` on a CUDA tensor waits for everything queued on the stream, including the next
    step the loop has launched in the meantime. Here each CUDA scalar is copied into pinned host
    memory behind an event, and reading waits only for the work queued up to this step. CPU
    values are read at once: they cost no wait, and a tensor the caller reuses cannot change them.
    """

    def __init__(self, **values: torch.Tensor | float | None) -> None:
        self._values: dict[str, torch.Tensor | float | None] = {}
        self._event: torch.cuda.Event | None = None
        for key, value in values.items():
            if torch.is_tensor(value) and value.is_cuda:
                value = value.detach().float().to("cpu", non_blocking=True)  # pinned destination
                self._event = self._event or torch.cuda.Event()
            elif value is not None:
                value = float(value)
            self._values[key] = value
        if self._event is not None:
            self._event.record()

    def get(self) -> dict[str, float | None]:
        if self._event is not None:
            self._event.synchronize()
        return {k: None if v is None else float(v) for k, v in self._values.items()}
