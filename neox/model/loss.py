"""The language-model loss on vocab-parallel logits."""

from __future__ import annotations

import torch

from megatron_core.tensor_parallel import vocab_parallel_cross_entropy


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over tokens where ``loss_mask`` is non-zero (fp32 scalar).

    logits [b, s, V / tp] (this rank's vocabulary slice), labels [b, s] global token ids.
    """
    losses = vocab_parallel_cross_entropy(logits, labels)  # [b, s] fp32
    mask = loss_mask.reshape(-1).float()
    return (losses.reshape(-1) * mask).sum() / mask.sum().clamp(min=1.0)
