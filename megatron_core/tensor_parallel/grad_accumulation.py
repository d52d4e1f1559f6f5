"""Weight gradients accumulated inside their GEMM (Megatron's ``gradient_accumulation_fusion``).

With gradient accumulation, autograd adds each micro-batch's weight gradient into ``weight.grad``:
one extra pass over every weight gradient (read both, write one) after the GEMM that made it. When
the optimizer has parked the running sum on the parameter as ``weight.main_grad``, ``linear`` below
computes the weight gradient as ``main_grad += dy^T x`` in the GEMM itself (cuBLAS with beta 1, one
rounding to the buffer's dtype) and hands autograd no weight gradient at all. Under torch.compile the
in-place op is called on the buffer itself: Inductor reinplaces the functionalized mutation.

Whoever sets ``main_grad`` owns it: it must be a tensor of the weight's shape and dtype, and it is
moved back to ``weight.grad`` before anything reads gradients (neox: ``MasterWeightAdamW.accumulate``).
Without ``main_grad`` the layer is plain ``F.linear``.

A compiled caller must retrace when ``main_grad`` appears. torch 2.13 does (a second graph); torch 2.11
with CUDA does not guard on the attribute, so its compiled blocks keep plain ``F.linear`` and the owner
adds the gradient autograd hands back (``bench/gemm_accumulation_probe.py``; docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("megatron_core::accumulate_weight_grad", mutates_args=("acc",))
def accumulate_weight_grad(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """acc [out, in] += dy [n, out]^T @ x [n, in]."""
    acc.addmm_(dy.t(), x)


@accumulate_weight_grad.register_fake
def _(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    return None


class _LinearAccumulatingWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                acc: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, acc)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, acc = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        accumulate_weight_grad(acc, dy2, x.reshape(-1, x.shape[-1]))
        dbias = dy2.sum(0) if ctx.has_bias else None
        return dy @ weight, None, dbias, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; with ``weight.main_grad`` set, its weight gradient is added into that buffer."""
    acc = getattr(weight, "main_grad", None)
    if acc is None:
        return F.linear(x, weight, bias)
    return _LinearAccumulatingWeightGrad.apply(x, weight, bias, acc)
