"""The optimizer and its parameter groups.

We build the optimizer ourselves and hand it to ``deepspeed.initialize`` (the DeepSpeed config has no
"optimizer" block) rather than letting DeepSpeed build it from the config, because:
- the parameter groups are ours: no weight decay on norms and biases, which DeepSpeed's config path
  does not do (it applies one weight decay to every parameter);
- PyTorch's fused AdamW is as fast as DeepSpeed's FusedAdam and needs no compiled ops, so the same
  code runs on a CPU test box and on an H100.
ZeRO accepts ``torch.optim.AdamW`` and DeepSpeed's FusedAdam / DeepSpeedCPUAdam as tested optimizers.
NeoX's "Adam" is apex/DeepSpeed FusedAdam in its default AdamW mode (decoupled weight decay), so both
"Adam" and "AdamW" build AdamW here.
"""

from __future__ import annotations

from typing import Any

import torch

from neox.config import NeoXArgs, fast_path
from neox.errors import ConfigError
from neox.training import engine as boundary
from neox.training.master_weights import MasterWeightAdamW, to_half_parameters

ADAM_TYPES = ("adam", "adamw", "fusedadam", "cpu_adam")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights that decay, and norms / biases (every tensor of rank < 2) that do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(".bias") or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def base_lr(args: NeoXArgs) -> float:
    """Peak learning rate: ``lr`` if set, else ``optimizer.params.lr``."""
    lr = args.lr.lr if args.lr.lr is not None else args.optim.optimizer.get("params", {}).get("lr")
    if lr is None:
        raise ConfigError("lr: expected a learning rate (set lr or optimizer.params.lr)")
    return float(lr)


def _offloads_optimizer(zero: dict[str, Any]) -> bool:
    return (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)


def build_optimizer(model: torch.nn.Module, args: NeoXArgs, device: torch.device) -> torch.optim.Optimizer:
    """Adam(W) or SGD over ``param_groups``, the fastest implementation this machine has.

    With master weights (``optimizer_master_weights``, or neox's choice for bf16: config.fast_path)
    the model's parameters are converted to bf16 here, in place, and the optimizer is
    ``MasterWeightAdamW``, which keeps their fp32 masters.
    """
    spec = args.optim.optimizer or {"type": "AdamW", "params": {}}
    kind = str(spec.get("type", "AdamW")).lower()
    params = dict(spec.get("params", {}))
    weight_decay = float(params.pop("weight_decay", args.optim.weight_decay))
    groups = param_groups(model, weight_decay)
    lr = base_lr(args)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(params.get("momentum", 0.0)))
    if kind not in ADAM_TYPES:
        raise ConfigError(f"optimizer.type: expected Adam, AdamW or SGD, got {spec.get('type')!r}")
    betas = tuple(params.get("betas", (0.9, 0.999)))
    eps = float(params.get("eps", 1e-8))
    if fast_path.master_weights_choice(args).enabled:
        to_half_parameters(model, torch.bfloat16)
        fp32_sums = fast_path.accumulates_in_fp32(args)
        dp_group = None
        if fp32_sums and (args.parallel.data_parallel_size or 1) > 1:
            from megatron_core import parallel_state

            dp_group = parallel_state.get_data_parallel_group()
        return MasterWeightAdamW(groups, lr=lr, betas=betas, eps=eps, compile=device.type == "cuda",
                                 accumulate_fp32=fp32_sums, gemm_accumulation=fast_path.accumulates_in_gemm(args),
                                 skip_nonfinite=fast_path.skips_nonfinite(args),
                                 dp_group=dp_group)
    offload = _offloads_optimizer(args.optim.zero_optimization)
    if kind == "cpu_adam" and (offload or device.type == "cpu") or offload and boundary.installed_op("cpu_adam"):
        # prebuilt, or named (GPT-NeoX's cpu_adam): DeepSpeed's CPU Adam, JIT-compiled on first use if need be
        return boundary.deepspeed_adam(groups, cpu=True, lr=lr, betas=betas, eps=eps)
    if device.type == "cuda" and boundary.installed_op("fused_adam"):
        return boundary.deepspeed_adam(groups, cpu=False, lr=lr, betas=betas, eps=eps)
    fused = device.type == "cuda" and not _offloads_optimizer(args.optim.zero_optimization)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
