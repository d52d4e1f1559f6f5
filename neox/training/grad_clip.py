"""Gradient-norm clipping for the ZeRO-0 engine without a DeepSpeed mixed-precision optimizer.

That engine (fp32, or ``torch_autocast`` with fp32 parameters) clips through DeepSpeed's
``clip_grad_norm_``: one norm kernel and one multiply per parameter, and it does not keep the norm,
so the step used to compute it a second time. Here the norm is one ``_foreach_norm`` over every
gradient and the scaling one ``_foreach_mul_``, with no host sync; DeepSpeed's own clipping is then
switched off (``engine.runtime_config``). Measured on an H100 at 1.1B parameters: see
docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from neox.training.master_weights import MasterWeightAdamW


def uses_own_clipping(zero_stage: int, fp16: bool, bf16: bool) -> bool:
    """True for the engines whose clipping neox does itself: ZeRO stage 0 without fp16/bf16 optimizers."""
    return zero_stage == 0 and not fp16 and not bf16


def takes_grad_scale(optimizer: object) -> bool:
    """True for PyTorch's fused Adam/AdamW, whose kernel divides each gradient by ``optimizer.grad_scale``
    (the hook GradScaler uses) while it updates the weights and writes the divided gradient back, and
    for neox's ``MasterWeightAdamW``, which divides its fp32 copy of each gradient."""
    if isinstance(optimizer, MasterWeightAdamW):
        return True
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                    optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most ``max_norm``; return the norm (pre-clip).

    With a fused Adam(W) ``optimizer`` (``takes_grad_scale``) the scaling is left to its next
    ``step``: ``optimizer.grad_scale`` is set to 1 / coefficient, which saves a separate pass over
    every gradient; ``release_grad_scale`` removes it after the step.

    Tensor-parallel shards (``tensor_model_parallel``) count on every tensor rank, replicated
    parameters once; the squared norm is summed over the tensor-parallel group. Gradients are
    already identical across data-parallel ranks when this runs (after the engine's all-reduce).
    """
    # MasterWeightAdamW accumulating in fp32 holds the step's gradients in its fp32 sums
    pairs = (optimizer.gradients(parameters) if isinstance(optimizer, MasterWeightAdamW)
             else [(p, p.grad) for p in parameters if p.grad is not None])
    if not pairs:
        return torch.zeros(())
    grads = [g for _, g in pairs]
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    counted = [g for p, g in pairs if tp_rank == 0 or getattr(p, "tensor_model_parallel", False)]
    # fp32 norms of bf16 gradients: a bf16 norm keeps 3 significant digits.
    norms = torch._foreach_norm(counted, 2, dtype=torch.float32) if counted else [torch.zeros((), device=grads[0].device)]
    total_sq = torch.stack(norms).square().sum()
    if parallel_state.get_tensor_model_parallel_world_size() > 1 and dist.is_initialized():
        dist.all_reduce(total_sq, group=parallel_state.get_tensor_model_parallel_group())
    total = total_sq.sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if optimizer is not None and takes_grad_scale(optimizer):
            optimizer.grad_scale = coef.reciprocal()  # type: ignore[attr-defined]
        else:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


def release_grad_scale(optimizer: object) -> None:
    """Undo ``clip_grad_norm_``'s ``grad_scale`` once the optimizer has stepped."""
    if hasattr(optimizer, "grad_scale"):
        del optimizer.grad_scale  # type: ignore[attr-defined]
