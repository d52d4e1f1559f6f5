"""A preallocated key/value cache for incremental decoding.

Per layer, keys and values of this rank's KV heads: [b, kv_heads / tp, max_length, head_dim].
``seen`` counts the tokens already written; ``GPTModel.forward(ids, kv_cache=cache)`` writes the
new tokens' keys/values at [seen, seen + s), attends over [0, seen + s) and then advances ``seen``.
``key_mask`` [b, max_length] (optional, True = a real token) lets rows of different lengths share one
cache (left padding, as batched evaluation needs): no query attends to a padding slot but its own.
That mask is built once per forward (every layer asks for the same one); on CUDA as the additive
float mask SDPA would otherwise convert a boolean one into at every layer, in rows padded to 8
elements so the memory-efficient kernel takes it without a copy.
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

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, kv_heads, s, d] for ``layer``; return the cached [b, kv_heads, seen + s, d]."""
        s = k.shape[2]
        end = self.seen + s
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {end} requested")
        self.keys[layer][:, :, self.seen:end] = k
        self.values[layer][:, :, self.seen:end] = v
        self._pending = s
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attn_mask(self, s: int, window: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Mask [b, 1, s, seen + s] for the ``s`` queries being written (None without key_mask).

        Boolean without ``dtype``; with it, additive (0 where attended, -inf elsewhere) in ``dtype``.
        ``window``: each query also sees only the keys at most ``window`` slots before it (slot
        distances are position distances within a row). Cached until ``seen`` or the arguments change.
        """
        if self.key_mask is None:
            return None
        key = (self.seen, s, window, dtype, id(self.key_mask))
        if self._mask is None or self._mask[0] != key:
            self._mask = (key, self._build_mask(s, window, dtype))
        return self._mask[1]

    def _build_mask(self, s: int, window: int | None, dtype: torch.dtype | None) -> torch.Tensor:
        dev, t = self.key_mask.device, self.seen + s
        causal = torch.ones(s, t, dtype=torch.bool, device=dev).tril(diagonal=t - s)
        own = torch.zeros(s, t, dtype=torch.bool, device=dev)
        own[:, t - s:] = torch.eye(s, dtype=torch.bool, device=dev)
        # a padding query sees itself only, so its (unused) output stays finite and never NaNs the values
        mask = (causal & self.key_mask[:, None, None, :t]) | own
        if window is not None:
            q_pos = torch.arange(t - s, t, device=dev).unsqueeze(1)
            k_pos = torch.arange(t, device=dev).unsqueeze(0)
            mask = mask & (k_pos <= q_pos) & (q_pos - k_pos <= window)
        if dtype is None:
            return mask
        padded = torch.full((*mask.shape[:-1], -(-t // 8) * 8), float("-inf"), dtype=dtype, device=dev)
        return padded[..., :t].masked_fill_(mask, 0.0)

    def advance(self) -> None:
        """Called once per model forward, after every layer has written its keys/values."""
        self.seen += self._pending
        self._pending = 0

    def reset(self) -> None:
        self.seen, self._pending, self._mask = 0, 0, None
