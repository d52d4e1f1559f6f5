"""The MLP: regular (linear1, activation, linear2) or gated (act(gate) * up, then linear2).

Gated weights are fused: ``linear1`` is [gate; up] with each tensor-parallel shard holding
[its gate rows; its up rows] (see docs/internals.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from neox.errors import ConfigError

_ACT = {"gelu": F.gelu, "geglu": F.gelu, "relu": F.relu, "reglu": F.relu, "silu": F.silu, "swish": F.silu, "swiglu": F.silu}
_GATED_ACTIVATIONS = ("geglu", "reglu", "swiglu")


def is_gated(cfg: Any) -> bool:
    return cfg.mlp_type == "llama" or cfg.activation in _GATED_ACTIVATIONS


def mlp_has_bias(cfg: Any) -> bool:
    """NeoX's LLaMA MLP has no biases whatever use_bias_in_mlp says."""
    return cfg.use_bias_in_mlp and cfg.mlp_type != "llama"


def ffn_size(cfg: Any) -> int:
    """Inner size per branch: ``intermediate_size`` if set (derived), else NeoX's rule."""
    if cfg.intermediate_size:
        return cfg.intermediate_size
    h = cfg.hidden_size
    if cfg.expansion_factor:
        return int(cfg.expansion_factor * h)
    if not is_gated(cfg):
        return 4 * h
    multiple = 256 if cfg.mlp_type == "llama" else max(cfg.mlp_multiple_of, 1)
    ff = int(2 * 4 * h / 3)
    return multiple * ((ff + multiple - 1) // multiple)


class MLP(nn.Module):
    """[b, s, h] -> [b, s, h]; linear1 column-parallel, linear2 row-parallel."""

    def __init__(self, cfg: Any, prefix: str, init: Any, *, sequence_parallel: bool = False, group: ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if cfg.activation not in _ACT:
            raise ConfigError(f"activation: expected one of {sorted(_ACT)}, got {cfg.activation!r}")
        self.gated = is_gated(cfg)
        self.act = _ACT[cfg.activation]
        ffn, h = ffn_size(cfg), cfg.hidden_size
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
