"""Rotary position embeddings computed in fp32 (frequencies, cos/sin and the rotation).

bf16 cannot even represent integer positions above 256 exactly, and its 8-bit mantissa turns
large angles into noise; doing the whole computation in fp32 and casting the result back keeps
long-context positions (> 4096) accurate. Nothing is stored as a buffer, so ``model.to(bf16)``
cannot silently downcast the tables. Layout: rotate-half (as transformers' Llama and GPT-NeoX),
applied to the first ``rotary_dim`` channels of each head (``rotary_pct`` < 1: partial rotary).
"""

from __future__ import annotations

import torch


def rotary_dim(head_dim: int, rotary_pct: float) -> int:
    """Channels rotated per head (GPT-NeoX: ``int(head_dim * rotary_pct)``)."""
    return int(head_dim * rotary_pct)


def inv_frequencies(dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """1 / base^(2i/dim), fp32, computed as transformers does so logits match exactly."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponent)


def rotary_cos_sin(position_ids: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [b, s, dim] in fp32 for integer positions [b, s] (or [s])."""
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    inv_freq = inv_frequencies(dim, base, position_ids.device)
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # [b, s, dim/2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # A cat of the halves, not a flip of them: Inductor indexes each half contiguously (vector loads), and
    # the flip's floor-divided index made the 7B step 2% slower (session 12, docs/performance.md).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, s, heads, d] by cos/sin [b, s, rot] (rot <= d) in fp32; returns x's dtype."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    x_rot = x[..., :rot].float()
    out = x_rot * cos + _rotate_half(x_rot) * sin
    if rot == x.shape[-1]:
        return out.to(x.dtype)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)
