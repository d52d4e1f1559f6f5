"""FP8 training of the transformer-block linears through torchao's float8 (tensorwise / rowwise recipes).

neox's Column/RowParallelLinear keep their parameters and tensor-parallel collectives; only the local
shard matmul is swapped (the layers' ``linear_fn`` hook) for torchao's float8 autograd function
``matmul_with_hp_or_float8_args``, the same one ``torchao.float8.Float8Linear`` runs. So every rank
casts its input, weight shard and output gradient to FP8 with dynamic scales (one per tensor, or one
per row), while the all-gathers / reductions around it stay in bf16 and the state_dict, ZeRO
partitioning, gradient clipping and checkpoints are exactly those of a bf16 run. Scales are computed
per rank from the shard it holds (no amax reduction across tensor-parallel ranks).

This is the only module that imports torchao, and only when FP8 is on.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from neox.config.compat import Fp8Plan, fp8_plan
from neox.errors import ConfigError

LinearFn = Callable[..., torch.Tensor]
_KEYS = "fp8_recipe / te_*"


def check_fp8_device(device: torch.device, emulate: bool) -> None:
    """One-line ConfigError unless ``device`` has FP8 tensor cores (or emulation is on, for tests)."""
    if emulate:
        return
    if device.type != "cuda":
        raise ConfigError(f"{_KEYS}: FP8 training needs a GPU with FP8 tensor cores (compute capability 8.9+, "
                          f"e.g. H100/H200); this run is on {device.type}")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"{_KEYS}: FP8 training needs compute capability 8.9+ (H100/H200/L40S); "
                          f"{name} has {cap[0]}.{cap[1]}; remove fp8_recipe and the te_* layer keys")


def _torchao() -> Any:
    try:
        import torchao.float8 as float8
    except ImportError as err:
        raise ConfigError(f"{_KEYS}: FP8 training needs torchao (scripts/install.sh installs it): {err}") from None
    return float8


def float8_config(plan: Fp8Plan) -> Any:
    """torchao's Float8LinearConfig for ``plan``: its recipe, with the gradient format and wgrad precision."""
    from torchao.float8.config import CastConfig, Float8LinearConfig, ScalingType, e4m3_dtype, e5m2_dtype

    if plan.recipe != "tensorwise":
        return dataclasses.replace(Float8LinearConfig.from_recipe_name(plan.recipe), emulate=plan.emulate)
    grad = e4m3_dtype if plan.grad_dtype == "e4m3" else e5m2_dtype
    wgrad: dict[str, Any] = {}
    if plan.hp_wgrad:  # GPT-NeoX's te_fp8_wgrad: false
        off = ScalingType.DISABLED
        wgrad = dict(cast_config_input_for_grad_weight=CastConfig(scaling_type=off),
                     cast_config_grad_output_for_grad_weight=CastConfig(scaling_type=off, target_dtype=grad))
    return Float8LinearConfig(cast_config_grad_output=CastConfig(target_dtype=grad), emulate=plan.emulate, **wgrad)


def _mm_config(config: Any) -> Any:
    """The LinearMMConfig Float8Linear.__init__ builds (output, grad_input, grad_weight GEMMs)."""
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    gemms = (config.gemm_config_output, config.gemm_config_grad_input, config.gemm_config_grad_weight)
    return LinearMMConfig(*(ScaledMMConfig(config.emulate, g.use_fast_accum, False, config.pad_inner_dim) for g in gemms))


def fp8_linear_fn(plan: Fp8Plan) -> LinearFn:
    """``linear(x, weight, bias=None)`` with F.linear's contract whose matmul is torchao's float8 one."""
    _torchao()
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    config = float8_config(plan)
    mm = _mm_config(config)

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # As Float8Linear.forward: under autocast the custom function sees the autocast dtype.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = matmul_with_hp_or_float8_args.apply(x, weight.t(), mm, config)  # [..., out]
        return y if bias is None else y + bias.to(y.dtype)

    return linear


def block_linears(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of the ``names`` linears inside every transformer block of ``model``."""
    from neox.model.transformer import TransformerBlock

    found = []
    for prefix, block in model.named_modules():
        if isinstance(block, TransformerBlock):
            for part in (block.attention, block.mlp):
                part_name = "attention" if part is block.attention else "mlp"
                found += [(f"{prefix}.{part_name}.{n}", getattr(part, n)) for n in names if hasattr(part, n)]
    return found


def convert_block_linears(model: nn.Module, precision: Any, device: torch.device) -> list[str]:
    """Give the block linears FP8 matmuls as ``precision`` (a PrecisionConfig) asks; their names.

    Parameters and module structure are unchanged (same state_dict names and tensors).
    """
    plan = fp8_plan(precision)
    if plan is None:
        return []
    check_fp8_device(device, plan.emulate)
    linear = fp8_linear_fn(plan)
    converted = block_linears(model, plan.linears)
    for _, layer in converted:
        layer.linear_fn = linear
    if plan.note and _is_rank0():
        print(f"neox: {plan.note}", file=sys.stderr)
    return [name for name, _ in converted]


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
