"""A preallocated key/value cache for incremental decoding.

Per layer, keys and values of this rank's KV heads: [b, kv_heads / tp, max_length, head_dim].
``seen`` counts the tokens already written; ``GPTModel.forward(ids, kv_cache=cache)`` writes the
new tokens' keys/values at [seen, seen + s), attends over [0, seen + s) and then advances ``seen``.
``key_mask`` [b, max_length] (optional, True = a real token) lets rows of different lengths share one
cache (left padding, as batched evaluation needs): no query attends to a padding slot but its own.
That mask is built once per forward (every layer asks for the same one); on CUDA as the additive
float mask SDPA would otherwise convert a boolean one into at every layer, in rows padded to 8
elements so the memory-efficient kernel takes it without a copy.

Static mode (``start_static()``, for a decode step captured in a CUDA graph, neox/model/decode_graph.py):
the write slot is the device tensor ``position`` instead of the Python int ``seen`` (which then stays
where the prompt left it). ``update`` writes there with ``index_copy_`` and returns the whole buffers,
the mask covers every slot (those past ``position`` masked), and ``advance`` adds to ``position`` on
the device: every shape and kernel argument is the same at every step, and nothing reads back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class KVCache:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    seen: int = 0
    _pending: int = field(default=0, repr=False)
    key_mask: torch.Tensor | None = None
    _mask: tuple[tuple[Any, ...], torch.Tensor] | None = field(default=None, repr=False)
    position: torch.Tensor | None = None
    """Static mode: the next write slot, a [1] long tensor on the cache's device (None: dynamic mode)."""

    @classmethod
    def allocate(
        cls, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, *,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)],
        )

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def start_static(self) -> None:
        """From now on write at the device slot ``position`` (starting at ``seen``); see the module doc."""
        self.position = torch.full((1,), self.seen, dtype=torch.long, device=self.keys[0].device)
        self._mask = None

    def positions(self, b: int, s: int, device: torch.device) -> torch.Tensor:
        """Default position ids [b, s] of the tokens being written (slot numbers: no left padding)."""
        if self.position is not None:
            return (self.position + torch.arange(s, device=device)).unsqueeze(0).expand(b, s)
        return torch.arange(self.seen, self.seen + s, device=device).unsqueeze(0).expand(b, s)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, kv_heads, s, d] for ``layer``; return the cached [b, kv_heads, seen + s, d]
        (static mode: the whole buffers [b, kv_heads, max_length, d]; no bounds check, as that would sync)."""
        s = k.shape[2]
        if self.position is not None:
            slots = self.position + torch.arange(s, device=self.position.device)
            self.keys[layer].index_copy_(2, slots, k)
            self.values[layer].index_copy_(2, slots, v)
            self._pending = s
            return self.keys[layer], self.values[layer]
        end = self.seen + s
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {end} requested")
        self.keys[layer][:, :, self.seen:end] = k
        self.values[layer][:, :, self.seen:end] = v
        self._pending = s
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attn_mask(self, s: int, window: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Mask [b, 1, s, seen + s] for the ``s`` queries being written (None without key_mask). Static mode:
        [b or 1, 1, s, max_length], always (the slots not written yet are masked).

        Boolean without ``dtype``; with it, additive (0 where attended, -inf elsewhere) in ``dtype``.
        ``window``: each query also sees only the keys at most ``window`` slots before it (slot
        distances are position distances within a row). Cached until ``seen`` or the arguments change
        (static mode: until ``advance``).
        """
        if self.key_mask is None and self.position is None:
            return None
        key = (self.seen, s, window, dtype, id(self.key_mask))
        if self._mask is None or self._mask[0] != key:
            self._mask = (key, self._build_mask(s, window, dtype))
        return self._mask[1]

    def _build_mask(self, s: int, window: int | None, dtype: torch.dtype | None) -> torch.Tensor:
        dev = self.keys[0].device if self.key_mask is None else self.key_mask.device
        if self.position is None:
            t = self.seen + s
            q_slot = torch.arange(t - s, t, device=dev)
        else:  # every slot, the queries' ones from the device tensor: the same kernels at every step
            t = self.max_length
            q_slot = self.position.to(dev) + torch.arange(s, device=dev)
        keep = None if self.key_mask is None else self.key_mask[:, None, None, :t]
        mask = visible(q_slot, torch.arange(t, device=dev), keep, window)
        if mask.dim() == 2:
            mask = mask[None, None]
        if dtype is None:
            return mask
        padded = torch.full((*mask.shape[:-1], -(-t // 8) * 8), float("-inf"), dtype=dtype, device=dev)
        return padded[..., :t].masked_fill_(mask, 0.0)

    def advance(self) -> None:
        """Called once per model forward, after every layer has written its keys/values."""
        if self.position is not None:
            self.position.add_(self._pending)  # on the device: part of a captured step
            self._mask = None  # the next forward's mask differs while the key stays the same
        else:
            self.seen += self._pending
        self._pending = 0

    def reset(self) -> None:
        self.seen, self._pending, self._mask, self.position = 0, 0, None, None


def visible(q_slot: torch.Tensor, k_slot: torch.Tensor, key_mask: torch.Tensor | None = None,
            window: int | None = None) -> torch.Tensor:
    """Which keys each query attends to: [s, t], or [b, 1, s, t] with ``key_mask`` [b, 1, 1, t].

    Slots are positions within a row (left padding shifts both). A query sees the keys at or before
    its slot that ``key_mask`` keeps and, with ``window``, at most ``window`` slots back. A query always
    sees its own slot, so a padding query's (unused) output stays finite and never NaNs the values.
    The one rule for the KV cache (dynamic and static) and the banded mask of uncached attention.
    """
    rel = q_slot[:, None] - k_slot[None, :]  # [s, t]: how far back each key is
    mask = rel >= 0
    if key_mask is not None:
        mask = (mask & key_mask) | (rel == 0)
    if window is not None:
        mask = mask & (rel <= window)
    return mask
