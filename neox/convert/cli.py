"""Command-line options shared by the tools that write neox checkpoints (the two importers and the
resharder) and the output dtypes of every converter."""

from __future__ import annotations

import argparse
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--precision`` values of the converters."""

_WITH_TORCH_NAMES = {**DTYPES, "bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def add_output_args(p: argparse.ArgumentParser, *, output_help: str, reshard: bool = False,
                    torch_dtype_names: bool = False) -> None:
    """--config_file, --output_dir, --num_output_shards, --pipe_parallel_size and --precision.

    An importer takes the tensor and pipeline layout from the config unless told otherwise; the
    resharder must be given the new tensor-parallel size and writes plain mp_rank files by default.
    ``torch_dtype_names`` also accepts bfloat16 / float32 / float16 for --precision.
    """
    p.add_argument("--config_file", required=True, nargs="+", help="neox YAML config(s) of the model")
    p.add_argument("--output_dir", required=True, help=output_help)
    if reshard:
        p.add_argument("--num_output_shards", type=int, required=True, help="new tensor-parallel size")
        p.add_argument("--pipe_parallel_size", type=int, default=0,
                       help="0: plain mp_rank files; >=1: pipeline layer files (any number of stages loads them)")
    else:
        p.add_argument("--num_output_shards", type=int, default=None,
                       help="tensor-parallel shards to write (default: the config's model_parallel_size)")
        p.add_argument("--pipe_parallel_size", type=int, default=None,
                       help="0: plain mp_rank files; >=1: pipeline layer files (default: the config's)")
    names = _WITH_TORCH_NAMES if torch_dtype_names else DTYPES
    p.add_argument("--precision", choices=sorted(names), default=None, help="output dtype (default: as stored)")


def output_layout(a: argparse.Namespace, args: Any) -> tuple[int, int, torch.dtype | None]:
    """(tensor-parallel size, pipe_parallel_size, dtype or None) from ``add_output_args``' options,
    falling back to the config ``args`` (NeoXArgs) for what was not given."""
    tp = a.num_output_shards or args.parallel.model_parallel_size
    pp = args.parallel.pipe_parallel_size if a.pipe_parallel_size is None else a.pipe_parallel_size
    return tp, pp, _WITH_TORCH_NAMES.get(a.precision or "")
