"""A preallocated key/value cache for incremental decoding.

Per layer, keys and values of this rank's KV heads: [b, kv_heads / tp, max_length, head_dim].
``seen`` counts the tokens already written; ``GPTModel.forward(ids, kv_cache=cache)`` writes the
new tokens' keys/values at [seen, seen + s), attends over [0, seen + s) and then advances ``seen``.
``key_mask`` [b, max_length] (optional, True = a real token) lets rows of different lengths share one
cache (left padding, as batched evaluation needs): no query attends to a padding slot but its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    seen: int = 0
    _pending: int = field(default=0, repr=False)
    key_mask: torch.Tensor | None = None

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

    def attn_mask(self, s: int) -> torch.Tensor | None:
        """Boolean mask [b, 1, s, seen + s] for the ``s`` queries being written (None without key_mask)."""
        if self.key_mask is None:
            return None
        t = self.seen + s
        causal = torch.ones(s, t, dtype=torch.bool, device=self.key_mask.device).tril(diagonal=t - s)
        own = torch.zeros(s, t, dtype=torch.bool, device=self.key_mask.device)
        own[:, t - s:] = torch.eye(s, dtype=torch.bool, device=self.key_mask.device)
        # a padding query sees itself only, so its (unused) output stays finite and never NaNs the values
        return (causal & self.key_mask[:, None, None, :t]) | own

    def advance(self) -> None:
        """Called once per model forward, after every layer has written its keys/values."""
        self.seen += self._pending
        self._pending = 0

    def reset(self) -> None:
        self.seen, self._pending = 0, 0
