"""The MLP: regular (linear1, activation, linear2) or gated (act(gate) * up, then linear2).

Gated weights are fused: ``linear1`` is [gate; up] with each tensor-parallel shard holding
[its gate rows; its up rows] (see docs/internals.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from neox.config.derive import mlp_has_bias, mlp_shape

if TYPE_CHECKING:
    from neox.config.model import ModelConfig

_ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def is_gated(cfg: ModelConfig) -> bool:
    return mlp_shape(cfg).gated


def ffn_size(cfg: ModelConfig) -> int:
    """Inner size per branch, by the config's one rule (``neox.config.derive.mlp_shape``)."""
    return mlp_shape(cfg).intermediate_size


class MLP(nn.Module):
    """[b, s, h] -> [b, s, h]; linear1 column-parallel, linear2 row-parallel."""

    def __init__(self, cfg: ModelConfig, prefix: str, init: Any, *, sequence_parallel: bool = False, group: ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape = mlp_shape(cfg)
        self.gated = shape.gated
        self.act = _ACT[shape.activation]
        ffn, h = shape.intermediate_size, cfg.hidden_size
        bias = mlp_has_bias(cfg)
        kw = dict(sequence_parallel=sequence_parallel, group=group, device=device, dtype=dtype)
        self.linear1 = ColumnParallelLinear(
            h, 2 * ffn if self.gated else ffn, bias=bias, sections=[ffn, ffn] if self.gated else None,
            init_method=init(prefix + "linear1.weight"), **kw,
        )
        self.linear2 = RowParallelLinear(ffn, h, bias=bias, init_method=init(prefix + "linear2.weight", output=True), **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear1(x)  # [b, s, (2) ffn / tp]
        if self.gated:
            gate, up = y.chunk(2, dim=-1)
            y = self.act(gate) * up
        else:
            y = self.act(y)
        return self.linear2(y)
