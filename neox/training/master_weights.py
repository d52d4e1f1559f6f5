"""AdamW over fp32 master weights for a model that holds bf16 parameters (``optimizer_master_weights``).

With fp32 parameters under torch.autocast, every forward casts each weight to bf16, every backward
casts each bf16 weight gradient back to fp32, and fused AdamW then reads fp32 gradients: passes
over the weights that only move bytes. Here the model holds the bf16 copy and gets bf16
gradients; the optimizer keeps the fp32 master weights beside the Adam moments and, in one pass,
upcasts each gradient, updates moments and master, and writes the rounded bf16 parameter. That
parameter is what autocast would have cast from the master, and at one micro-batch per step the
gradient is the bf16 GEMM output autocast would have upcast, so the update is fp32 AdamW's.

The update is PyTorch's own AdamW (``torch.optim.adamw.adamw``, foreach form); on a GPU it is
compiled together with the gradient upcast, the clip scaling and the bf16 write, which Inductor
fuses into a few kernels. Elsewhere it runs eagerly with the same ops.

A master is created from its parameter at the first step that sees it (or comes with a loaded
optimizer state), so weights loaded into the model before training starts are the ones trained.

Gradient accumulation (``accumulate_fp32``): a hook on each parameter adds its bf16 gradient into an
fp32 sum as soon as backward produces it and frees it, so the update is fp32 AdamW's on the fp32 sum
of the micro-batches' gradients (what DeepSpeed's ``grad_accum_dtype: fp32`` asks for) and the bf16
gradients of the whole model never coexist. Over several data-parallel ranks ``accumulate`` then
all-reduces the sums here, in fp32, once per step.

Gradient accumulation in bf16 with ``gemm_accumulation``: after a micro-batch that is not the last,
``accumulate`` parks each bf16 gradient on its parameter as ``main_grad``, and the next micro-batches'
linear layers add their weight gradients into it inside the GEMM
(``megatron_core.tensor_parallel.grad_accumulation``) instead of autograd adding them afterwards;
any other gradient (embeddings, norms, FP8 linears) is added here. At the last micro-batch the sums
go back to ``grad``. One process only: a data-parallel engine all-reduces ``grad`` inside backward.

``skip_nonfinite``: a step whose gradients are not all finite changes nothing (masters, moments,
step count) and sets ``overflow``, which DeepSpeed's engine reads to skip the LR step and count a
skipped iteration, as with its bf16 optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw


def _update(params: list[torch.Tensor], grads: list[torch.Tensor], masters: list[torch.Tensor],
            exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
            lr: float | torch.Tensor, inv_scale: torch.Tensor | None, *, beta1: float, beta2: float,
            eps: float, weight_decay: float, capturable: bool) -> None:
    grads32 = [g.float() for g in grads]
    if inv_scale is not None:
        torch._foreach_mul_(grads32, inv_scale)
    adamw(masters, grads32, exp_avgs, exp_avg_sqs, [], steps, foreach=True, capturable=capturable,
          amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)
    torch._foreach_copy_(params, masters)


def _accumulate(sums: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    torch._foreach_add_(sums, [g.float() for g in grads])


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose state per parameter is ``master`` (fp32), ``exp_avg``,
    ``exp_avg_sq`` and ``step``: torch AdamW's state plus the master, so a state saved by a
    torch AdamW over fp32 parameters loads (its master is then taken from the parameter).

    ``grad_scale`` (set by neox's gradient clipping, as on PyTorch's fused AdamW) divides every
    gradient in the next step. ``compile``: run the update through torch.compile (GPU).
    """

    overflow = False  # read by DeepSpeed's engine after each step (True: the step was skipped)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, compile: bool = False,
                 accumulate_fp32: bool = False, gemm_accumulation: bool = False, skip_nonfinite: bool = False,
                 dp_group: Any = None) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        # dynamic=False: each parameter group keeps its own static graph; left to automatic dynamic
        # shapes, the second group made Dynamo recompile one symbolic graph over its ~45 sizes (minutes).
        self._compiled = torch.compile(_update, dynamic=False) if compile else None
        self._accumulate = torch.compile(_accumulate, dynamic=False) if compile else _accumulate
        self._lr: dict[int, torch.Tensor] = {}
        self.accumulate_fp32, self.skip_nonfinite, self.dp_group = accumulate_fp32, skip_nonfinite, dp_group
        if gemm_accumulation and (accumulate_fp32 or dp_group is not None):
            raise ValueError("gemm_accumulation sums bf16 gradients on one process")
        self.gemm_accumulation = gemm_accumulation
        # fp32 gradient sums between accumulation boundaries; not optimizer state (zero at every save)
        self._sums: dict[torch.Tensor, torch.Tensor] = {}
        if accumulate_fp32:
            # each bf16 gradient goes into its sum as soon as backward has produced it, so the
            # model's bf16 gradients never all exist at once (peak memory as DeepSpeed's fp32 buffers)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        p.register_post_accumulate_grad_hook(self._sum_gradient)

    @torch.no_grad()
    def _sum_gradient(self, p: torch.Tensor) -> None:
        total = self._sums.get(p)
        if total is None:
            self._sums[p] = p.grad.float()
        else:
            total.add_(p.grad)
        p.grad = None

    @property
    def reduces_gradients(self) -> bool:
        """True when this optimizer all-reduces the gradient sums itself (the engine must not)."""
        return self.accumulate_fp32 and self.dp_group is not None

    @torch.no_grad()
    def accumulate(self, boundary: bool) -> None:
        """After a micro-batch's backward: add the bf16 gradients the backward hooks have not taken
        (ones set by hand) into the fp32 sums and free them; at the accumulation ``boundary``,
        all-reduce (average) the sums over ``dp_group``. With ``gemm_accumulation``: park and restore
        the bf16 sums (the module docstring)."""
        if self.gemm_accumulation:
            self._park_gradients(boundary)
        if not self.accumulate_fp32:
            return
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            if p not in self._sums:
                self._sums[p] = torch.zeros_like(p, dtype=torch.float32)
        if params:
            self._accumulate([self._sums[p] for p in params], [p.grad for p in params])
        for p in params:
            p.grad = None
        if boundary and self.dp_group is not None and self._sums:
            sums = list(self._sums.values())
            flat = torch._utils._flatten_dense_tensors(sums)
            dist.all_reduce(flat, group=self.dp_group)
            flat /= dist.get_world_size(self.dp_group)
            torch._foreach_copy_(sums, torch._utils._unflatten_dense_tensors(flat, sums))

    @torch.no_grad()
    def _park_gradients(self, boundary: bool) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                held, grad = getattr(p, "main_grad", None), p.grad
                if held is None:
                    if grad is not None and not boundary:
                        p.main_grad, p.grad = grad, None
                    continue
                if grad is not None:  # a layer that did not add into main_grad itself
                    held.add_(grad)
                    p.grad = None
                if boundary:
                    p.grad = held
                    del p.main_grad

    def gradients(self, parameters: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, gradient) for the next step: the fp32 sums when accumulating, else ``grad``."""
        if self.accumulate_fp32:
            return [(p, self._sums[p]) for p in parameters if p in self._sums]
        return [(p, p.grad) for p in parameters if p.grad is not None]

    @staticmethod
    def _finite(grads: list[torch.Tensor], grad_scale: torch.Tensor | None) -> bool:
        # Clipping's grad_scale (norm / max_norm, or 1) is finite exactly when the norm is; one host sync.
        if grad_scale is None:
            if not grads:
                return True
            grad_scale = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).sum()
        return bool(torch.isfinite(grad_scale).all())

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().to(torch.float32, copy=True)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(state["master"])
            state["exp_avg_sq"] = torch.zeros_like(state["master"])
        # A float step on the parameter's device, as fused/capturable AdamW keep it (no host sync).
        step = state.get("step", 0.0)
        if not torch.is_tensor(step) or step.device != p.device or step.dtype != torch.float32:
            state["step"] = torch.as_tensor(float(step), dtype=torch.float32).to(p.device)
        return state

    def _lr_tensor(self, index: int, value: float, device: torch.device) -> torch.Tensor:
        # A compiled update would recompile for every new Python float the LR schedule sets.
        lr = self._lr.get(index)
        if lr is None or lr.device != device:
            lr = self._lr[index] = torch.empty((), dtype=torch.float32, device=device)
        return lr.fill_(value)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        inv_scale = None if grad_scale is None else grad_scale.reciprocal().float()
        plan = [(index, group, self.gradients(group["params"])) for index, group in enumerate(self.param_groups)]
        self.overflow = self.skip_nonfinite and not self._finite([g for *_, pg in plan for _, g in pg], grad_scale)
        for index, group, pairs in plan:
            if not pairs or self.overflow:
                continue
            params = [p for p, _ in pairs]
            states = [self._init_state(p) for p in params]
            beta1, beta2 = group["betas"]
            kw = dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            lists = (params, [g for _, g in pairs], [s["master"] for s in states],
                     [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states])
            if self._compiled is not None:
                lr = self._lr_tensor(index, float(group["lr"]), params[0].device)
                self._compiled(*lists, lr, inv_scale, capturable=True, **kw)
            else:  # capturable on a GPU: the step counts stay there, read without a host sync
                _update(*lists, float(group["lr"]), inv_scale, capturable=params[0].is_cuda, **kw)
        if self._sums:
            torch._foreach_zero_(list(self._sums.values()))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch.optim.Optimizer casts loaded floating-point state to the parameter's dtype, which
        # would round the fp32 masters and moments to bf16: put the saved tensors back as they were
        # (copies: torch keeps a loaded step tensor shared with the source dict).
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for param, pid in zip(params, saved_ids):
            for key, value in state_dict["state"].get(pid, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[param][key] = value.to(device=param.device, copy=True)


def to_half_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Convert the model's floating-point parameters to ``dtype`` in place (the optimizer's masters
    are created from them at its first step)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def adopt_masters(optimizer: Any) -> int:
    """After a checkpoint saved with ``optimizer_master_weights`` loads into a torch optimizer over
    fp32 parameters: the module weights in it are the bf16 copies, so each parameter takes its fp32
    master from the loaded state, which then drops it. Returns how many parameters did."""
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, MasterWeightAdamW):
        return 0
    adopted = 0
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                master = optimizer.state.get(p, {}).pop("master", None)
                if master is not None and master.shape == p.shape:
                    p.copy_(master)
                    adopted += 1
    return adopted
