"""FP8 training of the transformer-block linears through torchao's float8 (tensorwise / rowwise recipes).

neox's Column/RowParallelLinear keep their parameters and tensor-parallel collectives; only the local
shard matmul is swapped (the layers' ``linear_fn`` hook) for neox's copy of torchao's float8 autograd
function ``matmul_with_hp_or_float8_args``, the one ``torchao.float8.Float8Linear`` runs: the same
casts (torchao's own functions and configs) and GEMMs, with two differences that leave every FP8 bit
as torchao's. Under tensorwise scaling the weight-gradient GEMM casts the input with the scale its
forward computed, instead of taking that amax a second time; and at tensor parallel > 1 the amax
reduction below. So every rank casts its input, weight shard and output gradient to FP8 with dynamic
scales (one per tensor, or one per row), while the all-gathers / reductions around it stay in bf16
and the state_dict, ZeRO partitioning, gradient clipping and checkpoints are exactly those of a bf16
run. Scales are computed from the whole tensor, as on one rank: where a tensor-parallel rank holds a
shard of a tensor and the scale's amax runs over the split dimension (tensorwise always; rowwise when
the row is split), the shard's amax is all-reduced (MAX) over the tensor-parallel group first, so TP n
casts every element with the scale TP 1 uses and trains the same losses
(tests/distributed/test_fp8_train.py).

This is the only module that imports torchao, and only when FP8 is on.
"""

from __future__ import annotations

import dataclasses
import functools
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


# Which dimension of each matmul operand a tensor-parallel layer splits: x [..., K] and the weight
# transposed w_t [K, N]; grad_output g [T, N]. "last"/"first" name torchao's axiswise dims -1 / 0.
SHARDED = {"column": {"weight_t": "last", "grad_output": "last"},  # N split; x and g's T whole
           "row": {"input": "last", "weight_t": "first"}}  # K split; g whole


class _GroupMesh:
    """What torchao's amax reduction asks of a DeviceMesh (``get_group``), for a plain ProcessGroup."""

    def __init__(self, group: Any) -> None:
        self._group = group

    def get_group(self) -> Any:
        return self._group


def _reuses_input_scale(config: Any) -> bool:
    """Whether the weight-gradient GEMM's input cast is the output GEMM's (dynamic, tensorwise, same format).

    Then the backward casts the saved input with the scale the forward computed: the same FP8 bits as
    torchao's second amax over the input, without that amax. Under torch.compile the input is
    recomputed in the backward (the partitioner keeps its producer's inputs), and the second amax was
    one more full read of it per linear (measured on the H200: docs/performance.md, FP8 training).
    """
    from torchao.float8.config import ScalingGranularity, ScalingType

    a, b = config.cast_config_input, config.cast_config_input_for_grad_weight
    return (a.scaling_type is b.scaling_type is ScalingType.DYNAMIC and a.target_dtype == b.target_dtype
            and a.scaling_granularity is b.scaling_granularity is ScalingGranularity.TENSORWISE)


@functools.cache  # one autograd Function for every layer: it holds no per-layer state (that is ctx)
def _float8_matmul() -> Any:
    """torchao's ``matmul_with_hp_or_float8_args`` (the same five casts, configs and GEMMs) with each
    cast's amax all-reduced where the tensor-parallel split cuts across it, and the input's forward
    scale reused for the weight gradient where the two casts are the same (``_reuses_input_scale``)."""
    from torchao.float8.config import ScalingGranularity, ScalingType
    from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole as Role
    from torchao.float8.float8_training_tensor import hp_tensor_and_scale_to_float8

    def cast(t: torch.Tensor, cast_cfg: Any, ctx: tuple, role: Any, name: str, axis: int) -> torch.Tensor:
        mm, config, sharded, mesh = ctx
        if cast_cfg.scaling_type is ScalingType.DISABLED:
            return t
        gran = cast_cfg.scaling_granularity
        split = sharded.get(name)
        reduce = split is not None and (gran is ScalingGranularity.TENSORWISE or split == ("last" if axis == -1 else "first"))
        return hp_tensor_to_float8_dynamic(t, cast_cfg.target_dtype, mm, reduce_amax=reduce, gemm_input_role=role,
                                           device_mesh=mesh, scaling_granularity=gran,
                                           axiswise_dim=get_maybe_axiswise_dim(axis, gran),
                                           round_scales_to_power_of_2=config.round_scales_to_power_of_2)

    class Float8Matmul(torch.autograd.Function):
        @staticmethod
        def forward(fctx: Any, x: torch.Tensor, w_t: torch.Tensor, ctx: tuple) -> torch.Tensor:  # type: ignore[override]
            fctx.neox = ctx
            c = ctx[1]
            x8 = cast(x, c.cast_config_input, ctx, Role.INPUT, "input", -1)
            fctx.save_for_backward(x, w_t, *([x8._scale] if _reuses_input_scale(c) else []))
            w8 = cast(w_t, c.cast_config_weight, ctx, Role.WEIGHT, "weight_t", 0)
            y = torch.mm(x8.reshape(-1, x8.shape[-1]), w8)
            return y.reshape(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(fctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
            x, w_t, *x_scale = fctx.saved_tensors
            ctx = fctx.neox
            mm, c = ctx[0], ctx[1]
            g = grad.reshape(-1, grad.shape[-1])
            g8 = cast(g, c.cast_config_grad_output, ctx, Role.GRAD_OUTPUT, "grad_output", -1)
            w8 = cast(w_t, c.cast_config_weight_for_grad_input, ctx, Role.WEIGHT, "weight_t", -1)
            grad_x = torch.mm(g8, w8.t()).reshape(*grad.shape[:-1], w_t.shape[0])
            g8w = cast(g, c.cast_config_grad_output_for_grad_weight, ctx, Role.GRAD_OUTPUT, "grad_output", 0)
            x2 = x.reshape(-1, x.shape[-1])
            if x_scale:
                x8w = hp_tensor_and_scale_to_float8(x2, x_scale[0], c.cast_config_input_for_grad_weight.target_dtype,
                                                    mm, Role.INPUT)
            else:
                x8w = cast(x2, c.cast_config_input_for_grad_weight, ctx, Role.INPUT, "input", 0)
            grad_w = torch.mm(g8w.t(), x8w)
            return grad_x, grad_w.t(), None

    return Float8Matmul


def fp8_linear_fn(plan: Fp8Plan, kind: str | None = None, group: Any = None) -> LinearFn:
    """``linear(x, weight, bias=None)`` with F.linear's contract whose matmul is torchao's float8 one.

    ``kind`` ("column" / "row") and ``group`` (the layer's tensor-parallel group, None: parallel_state's):
    with more than one rank, the casts of split tensors take their amax over the group (see SHARDED).
    """
    _torchao()
    from megatron_core.tensor_parallel.utils import group_world_size, resolve_group

    config = float8_config(plan)
    split = kind is not None and group_world_size(group) > 1
    ctx = (_mm_config(config), config, SHARDED[kind] if split else {}, _GroupMesh(resolve_group(group)) if split else None)
    matmul = _float8_matmul()

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # As Float8Linear.forward: under autocast the custom function sees the autocast dtype.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = matmul.apply(x, weight.t(), ctx)  # [..., out]
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
    from megatron_core.tensor_parallel.layers import ColumnParallelLinear

    check_fp8_device(device, plan.emulate)
    converted = block_linears(model, plan.linears)
    fns: dict[tuple, LinearFn] = {}
    for _, layer in converted:
        key = ("column" if isinstance(layer, ColumnParallelLinear) else "row", layer.group)
        if key not in fns:
            fns[key] = fp8_linear_fn(plan, *key)
        layer.linear_fn = fns[key]
    if plan.note and _is_rank0():
        print(f"neox: {plan.note}", file=sys.stderr)
    return [name for name, _ in converted]


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
