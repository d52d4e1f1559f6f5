"""Change the tensor- and pipeline-parallel layout of a neox checkpoint.

    python tools/reshard_checkpoint.py --input_dir checkpoints/run --config_file configs/run.yml \
        --output_dir checkpoints/run_tp1 --num_output_shards 1 --pipe_parallel_size 0

Weights are unsharded tensor by tensor (memory-mapped) and written in the new layout, keeping the
step tag. Optimizer state is not carried over: DeepSpeed's ZeRO shards are flat per data-parallel
rank and tied to the old partitioning (see docs/conversion.md); resume the new layout with
``finetune: true`` (weights only), or use DeepSpeed's universal checkpoints for optimizer state.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neox.config.derive import pad_vocab_size  # noqa: E402
from neox.convert import names, weights  # noqa: E402
from neox.convert.cli import add_output_args, output_layout  # noqa: E402
from neox.errors import exit_code_of  # noqa: E402


def reshard(input_dir: str | Path, cfg: Any, output_dir: str | Path, tp: int, pp: int,
            dtype: torch.dtype | None = None, progress: bool = True) -> Path:
    """Rewrite the weights of ``input_dir`` with ``tp`` TP shards in the plain (pp=0) or pipeline layout."""
    tag_dir = weights.resolve_tag_dir(input_dir)
    full = weights.read_full_weights(tag_dir, cfg)
    full, cfg = repad_vocab(full, cfg, tp)
    step = int(tag_dir.name[len("global_step"):]) if tag_dir.name.startswith("global_step") else 0
    optim = sorted(p.name for p in tag_dir.glob("*optim_states.pt"))
    if optim and progress:
        print(f"note: {len(optim)} optimizer file(s) in {tag_dir} are not resharded; resume with finetune: true")
    return weights.write_weights(full, cfg, output_dir, tp, pp, tag=tag_dir.name, dtype=dtype, iteration=step,
                                 progress=progress)


def repad_vocab(full: Mapping[str, torch.Tensor], cfg: Any, tp: int) -> tuple[Mapping[str, torch.Tensor], Any]:
    """Keep the checkpoint's vocabulary rows, padded further only if they do not divide by ``tp``."""
    rows = full["embedding.word_embeddings.weight"].shape[0]
    padded = rows if rows % tp == 0 else pad_vocab_size(rows, cfg.make_vocab_size_divisible_by, tp)
    cfg = dataclasses.replace(cfg, padded_vocab_size=padded)
    if padded == rows:
        return full, cfg
    vocab_names = ("embedding.word_embeddings.weight", "output_layer.weight")
    makers = {n: (lambda n=n: names.pad_vocab(full[n], padded) if n in vocab_names else full[n]) for n in full}
    return names.LazyWeights(makers), cfg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_dir", required=True, help="checkpoint folder (with latest) or a tag folder")
    add_output_args(p, output_help="checkpoint folder to write", reshard=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    def run() -> None:
        from neox.config.args import NeoXArgs

        args = NeoXArgs.from_ymls(a.config_file)
        _, pp, dtype = output_layout(a, args)
        reshard(a.input_dir, args.model, a.output_dir, a.num_output_shards, pp, dtype)

    return exit_code_of(run)


if __name__ == "__main__":
    sys.exit(main())
