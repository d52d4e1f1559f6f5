"""GPT-NeoX initialisation methods, seeded per parameter name.

Every weight is drawn as the full tensor from a generator seeded by (seed, parameter name), so the
full model is identical at any tensor- or pipeline-parallel size and does not depend on which
layers a pipeline stage builds. Formulas as gpt-neox megatron/model/init_functions.py.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from neox.errors import ConfigError

if TYPE_CHECKING:
    from neox.config.model import ModelConfig

InitFn = Callable[[torch.Tensor], Any]


def _std_method(std: float) -> Callable[[torch.Tensor, torch.Generator], Any]:
    return lambda t, g: t.normal_(0.0, std, generator=g)


def init_method(name: str, *, std: float, num_layers: int, hidden_size: int) -> Callable[[torch.Tensor, torch.Generator], Any]:
    """The NeoX method ``name`` as fn(tensor, generator)."""
    if name == "normal":
        return _std_method(std)
    if name == "scaled_normal":
        return _std_method(std / math.sqrt(2.0 * num_layers))
    if name == "single_residual_scaled_normal":  # GPT-NeoX's: scaled_normal for one residual branch per layer
        return _std_method(std / math.sqrt(num_layers))
    if name == "small_init":
        return _std_method(math.sqrt(2.0 / (5.0 * hidden_size)))
    if name == "wang_init":
        return _std_method(2.0 / num_layers / math.sqrt(hidden_size))
    if name == "xavier_uniform":
        return lambda t, g: nn.init.xavier_uniform_(t, generator=g)
    if name == "xavier_normal":
        return lambda t, g: nn.init.xavier_normal_(t, generator=g)
    if name in ("orthogonal", "scaled_orthogonal"):
        gain = 2.0 / math.sqrt(num_layers if name == "scaled_orthogonal" else 1)
        return lambda t, g: nn.init.orthogonal_(t, gain=gain, generator=g)
    raise ConfigError(f"init_method: unknown method {name!r}")


def param_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one parameter (crc32 does not vary between processes, unlike hash())."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


class ModelInit:
    """Hands each layer the init function for a named parameter."""

    def __init__(self, cfg: ModelConfig, seed: int) -> None:
        kw = dict(std=cfg.init_method_std, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size)
        self.seed = seed
        self._main = init_method(cfg.init_method, **kw)
        self._output = init_method(cfg.output_layer_init_method, **kw)

    def __call__(self, name: str, output: bool = False) -> InitFn:
        """Init for parameter ``name`` (plain-model name); ``output``: a residual output layer."""
        method = self._output if output else self._main
        seed = param_seed(self.seed, name)

        def init_(t: torch.Tensor) -> Any:
            g = torch.Generator(device=t.device).manual_seed(seed)
            return method(t, g)

        return init_
