"""RMSNorm and LayerNorm with the parameter names of the contract (``weight``, optional ``bias``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megatron_core.tensor_parallel import copy_to_tensor_model_parallel_region

if TYPE_CHECKING:
    from neox.config.model import ModelConfig


class Norm(nn.Module):
    """``kind`` 'rmsnorm' (F.rms_norm, no bias) or 'layernorm' (F.layer_norm, bias optional).

    Under sequence parallelism each tensor rank normalises a different slice of the sequence, so
    the weight passes through ``copy_to_tensor_model_parallel_region``: identity forward, gradients
    all-reduced backward, which sums the per-slice contributions.
    """

    def __init__(
        self, kind: str, hidden_size: int, eps: float, *, bias: bool = True, sequence_parallel: bool = False,
        group: ProcessGroup | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.eps, self.shape = kind, eps, (hidden_size,)
        self.sequence_parallel, self.group = sequence_parallel, group
        kw = dict(device=device, dtype=dtype or torch.float32)
        self.weight = nn.Parameter(torch.ones(hidden_size, **kw))
        if kind == "layernorm" and bias:
            self.bias = nn.Parameter(torch.zeros(hidden_size, **kw))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if x.dtype != weight.dtype and x.dtype in (torch.bfloat16, torch.float16):
            # A half-precision residual stream over fp32 weights (autocast): one dtype keeps the
            # fused norm kernel; the output is half precision either way.
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        if self.sequence_parallel:
            weight = copy_to_tensor_model_parallel_region(weight, self.group)
            bias = None if bias is None else copy_to_tensor_model_parallel_region(bias, self.group)
        if self.kind == "rmsnorm":
            return F.rms_norm(x, self.shape, weight, self.eps)
        return F.layer_norm(x, self.shape, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.shape[0]}, eps={self.eps}"


def build_norm(cfg: ModelConfig, **kw: Any) -> Norm:
    """The norm of ``cfg.norm`` with its epsilon and ``use_bias_in_norms``."""
    eps = cfg.rms_norm_epsilon if cfg.norm == "rmsnorm" else cfg.layernorm_epsilon
    return Norm(cfg.norm, cfg.hidden_size, eps, bias=cfg.use_bias_in_norms, **kw)
