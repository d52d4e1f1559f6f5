"""The DeepSpeed config derived from NeoXArgs (the dict handed to ``deepspeed.initialize``)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from neox.config import compat

if TYPE_CHECKING:
    from neox.config.args import NeoXArgs

# DeepSpeed prints its own loss line every steps_per_print steps; neox logs by log_interval instead.
QUIET_STEPS_PER_PRINT = 10**9


def zero_config(zero: dict[str, Any]) -> dict[str, Any]:
    """NeoX's zero_optimization block for DeepSpeed 0.19: ``cpu_offload`` (removed there) becomes
    ``offload_optimizer``."""
    out = copy.deepcopy(zero) or {}
    out.setdefault("stage", 0)
    if "cpu_offload" in out:
        if out.pop("cpu_offload"):
            out.setdefault("offload_optimizer", {"device": "cpu"})
    return out


def optimizer_config(args: NeoXArgs) -> dict[str, Any] | None:
    """The optimizer block: NeoX's dict, with lr and weight_decay filled in from their own keys."""
    opt = copy.deepcopy(args.optim.optimizer)
    if not opt:
        return None
    params = opt.setdefault("params", {})
    if args.lr.lr is not None:
        params["lr"] = args.lr.lr
    params.setdefault("weight_decay", args.optim.weight_decay)
    return opt


def build_deepspeed_config(args: NeoXArgs) -> dict[str, Any]:
    t, p = args.training, args.precision
    config: dict[str, Any] = {
        "train_batch_size": t.train_batch_size,
        "train_micro_batch_size_per_gpu": t.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": args.optim.gradient_clipping,
        "zero_optimization": zero_config(args.optim.zero_optimization),
        "fp16": copy.deepcopy(p.fp16) if p.fp16 else {"enabled": False},
        "bf16": copy.deepcopy(p.bf16) if p.bf16 else {"enabled": False},
        "wall_clock_breakdown": args.logging.wall_clock_breakdown,
        "steps_per_print": QUIET_STEPS_PER_PRINT,
        "zero_allow_untested_optimizer": args.optim.zero_allow_untested_optimizer,
    }
    optimizer = optimizer_config(args)
    if optimizer is not None:
        config["optimizer"] = optimizer
    if p.data_types:
        config["data_types"] = copy.deepcopy(p.data_types)
    if p.communication_data_type:
        config["communication_data_type"] = p.communication_data_type
    elif p.fp32_allreduce:
        config["communication_data_type"] = "fp32"
    for key in compat.DEEPSPEED_PASSTHROUGH:
        if key in args.compat and key != "deepspeed_extra_args" and args.compat[key] is not None:
            config[key] = copy.deepcopy(args.compat[key])
    config.update(copy.deepcopy(args.compat.get("deepspeed_extra_args") or {}))
    return config
