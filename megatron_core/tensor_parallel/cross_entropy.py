"""Cross entropy over vocab-parallel logits without gathering the full vocabulary.

Each rank holds logits[..., V/tp]. The softmax normaliser needs only two all-reduces of [b, s]
tensors (max, then sum of exponentials) plus one for the target logit; computed in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from megatron_core.tensor_parallel.utils import group_rank, group_world_size, resolve_group, vocab_range


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        g = resolve_group(group)
        logits = logits.float()
        local_vocab = logits.shape[-1]
        world = group_world_size(group)
        start, end = vocab_range(local_vocab * world, group_rank(group), world)

        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=g)
        shifted = logits - logits_max.unsqueeze(-1)

        outside = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=g)

        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=g)
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax  # reuse the saved buffer: d loss / d logits = softmax - onehot(target)
        update = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -update.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) from logits [b, s, V/tp] and global targets [b, s].

    The returned gradient is in fp32; autograd casts it to the logits' dtype.
    """
    if group_world_size(group) == 1:
        v = logits.shape[-1]
        return F.cross_entropy(logits.float().reshape(-1, v), target.reshape(-1), reduction="none").view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, group)
