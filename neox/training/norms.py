"""Per-parameter L2 norms for the metrics record: GPT-NeoX's ``log_param_norm`` and ``log_grad_norm``.

GPT-NeoX logs ``parameter_norms/{name}`` and ``gradient_norms/{name}`` to W&B / TensorBoard; neox adds
them to the logged record as ``param_norms`` / ``grad_norms`` (``{name: norm}``, GPTModel names) plus
the totals ``param_norm`` / ``grad_norm_total``, and the writers send them on under GPT-NeoX's names.
Each norm is that of the full tensor: tensor-parallel shards are reduced, pipeline stages gathered.
Every rank calls these at the same iterations (they are collectives); the values are equal on all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_core import parallel_state
from neox.training import engine as boundary


def named_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``module``'s parameters under their GPTModel names (a pipeline stage maps its own)."""
    plain = getattr(module, "plain_named_parameters", None)
    return plain() if callable(plain) else module.named_parameters()


def _full_sq(names: list[str], sq: list[torch.Tensor], split: list[bool]) -> dict[str, float]:
    """{name: norm} from this rank's squared norms: reduced over tensor-parallel ranks, gathered over stages."""
    if not sq:
        local: dict[str, float] = {}
    else:
        vec = torch.stack([s.float() for s in sq])
        tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.is_initialized() else 1
        if tp > 1:
            # a replicated tensor is counted once: each tensor-parallel rank adds 1/tp of it
            weights = torch.tensor([1.0 if s else 1.0 / tp for s in split], device=vec.device)
            vec = vec * weights
            dist.all_reduce(vec, group=parallel_state.get_tensor_model_parallel_group())
        local = dict(zip(names, vec.sqrt().tolist()))
    pp = parallel_state.get_pipeline_model_parallel_world_size() if parallel_state.is_initialized() else 1
    if pp == 1:
        return local
    stages: list[Any] = [None] * pp
    dist.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
    merged: dict[str, float] = {}
    for part in stages:
        merged.update(part)
    return merged


def _total(norms: dict[str, float]) -> float:
    return math.sqrt(sum(v * v for v in norms.values()))


def _full_param(p: nn.Parameter) -> torch.Tensor:
    if hasattr(p, "ds_id"):  # ZeRO-3 keeps a partition on each rank; DeepSpeed gathers the fp32 tensor
        return boundary.full_fp32_param(p)
    return p.detach()


def param_norms(module: nn.Module) -> dict[str, float]:
    """{name: L2 norm of the full parameter} for every parameter of the model."""
    names, sq, split = [], [], []
    for name, p in named_parameters(module):
        t = _full_param(p)
        names.append(name)
        sq.append(t.float().pow(2).sum())
        split.append(bool(getattr(p, "tensor_model_parallel", False)))
    return _full_sq(names, sq, split)


class GradNorms:
    """Captures per-parameter gradient norms after the last backward of a step, before the optimizer
    (DeepSpeed's ``safe_get_full_grad``: the reduced gradient under every ZeRO stage; neox's
    MasterWeightAdamW: its own gradients), unscaled by fp16's loss scale. The plain step calls
    ``capture`` itself; on the pipeline engine ``Engine.before_pipeline_step`` calls it inside
    ``train_batch``. The norms stay on the device until ``read`` (at a logged iteration)."""

    def __init__(self, loss_scale: Callable[[], float]) -> None:
        self.loss_scale = loss_scale
        self._names: list[str] = []
        self._sq: list[torch.Tensor] = []
        self._split: list[bool] = []
        self._scale = 1.0

    def capture(self, module: nn.Module, optimizer: Any = None) -> None:
        # neox's MasterWeightAdamW keeps the step's gradients (fp32 sums when accumulating) itself
        own = getattr(optimizer, "gradients", None)
        held = {id(p): g for p, g in own(list(module.parameters()))} if callable(own) else None
        names, sq, split = [], [], []
        for name, p in named_parameters(module):
            g = held.get(id(p)) if held is not None else boundary.full_grad(p)
            if g is None:
                continue
            names.append(name)
            sq.append(g.detach().float().pow(2).sum())
            split.append(bool(getattr(p, "tensor_model_parallel", False)))
        self._names, self._sq, self._split = names, sq, split
        # the scale these gradients carry: the step after capture may change it (an overflow halves it)
        self._scale = self.loss_scale() or 1.0

    def read(self) -> dict[str, float]:
        scale = self._scale
        return {k: v / scale for k, v in _full_sq(self._names, self._sq, self._split).items()}


def norm_fields(engine: Any, log_param_norm: bool, grads: GradNorms | None) -> dict[str, Any]:
    """The record's norm fields the config asks for (collective: every rank calls it)."""
    out: dict[str, Any] = {}
    if log_param_norm:
        out["param_norms"] = param_norms(engine.module)
        out["param_norm"] = _total(out["param_norms"])
    if grads is not None:
        out["grad_norms"] = grads.read()
        out["grad_norm_total"] = _total(out["grad_norms"])
    return out
