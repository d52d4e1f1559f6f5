"""Full neox weights from and to DeepSpeed's checkpoint files, at any tensor/pipeline layout.

``read_full_weights`` unshards and ``write_weights`` shards by the model's own parameter table
(neox.model.layout), so every converter and the resharder cut tensors as the model does.
"""

from __future__ import annotations

import pickle
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from megatron_core.tensor_parallel.utils import TensorSplit, shard, unshard
from neox.convert.names import LazyWeights
from neox.errors import CheckpointError
from neox.model.layout import ParamLayout, full_shapes, model_layout

if TYPE_CHECKING:
    from neox.config.model import ModelConfig


def shard_for_rank(name: str, full: torch.Tensor, split: TensorSplit | None, tp: int, rank: int) -> torch.Tensor:
    """TP shard ``rank`` of the full tensor ``name``, as a tensor of its own (safe to torch.save)."""
    try:
        piece = shard(full, split, rank, tp)
    except ValueError as err:
        raise CheckpointError(f"{name}: shape {tuple(full.shape)} does not split over tensor-parallel size {tp}: {err}") \
            from err
    # A view would make torch.save write the whole full tensor's storage.
    if piece.untyped_storage().data_ptr() == full.untyped_storage().data_ptr():
        return piece.contiguous().clone()
    return piece


# ---------------------------------------------------------------- DeepSpeed layouts on disk
_PIPE_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def resolve_tag_dir(path: str | Path) -> Path:
    """``{load}`` with a ``latest`` file -> ``{load}/{tag}``; a tag directory is returned as is."""
    p = Path(path)
    if (p / "latest").is_file():
        tag = (p / "latest").read_text().strip()
        if not (p / tag).is_dir():
            raise CheckpointError(f"{p / 'latest'}: names tag {tag!r}, but {p / tag} does not exist")
        return p / tag
    if p.is_dir() and any(_MP_FILE.search(f.name) or _PIPE_FILE.search(f.name) for f in p.iterdir()):
        return p
    raise CheckpointError(f"{p}: expected a 'latest' file or DeepSpeed model files "
                          "(mp_rank_XX_model_states.pt or layer_XX-model_YY-model_states.pt)")


def load_tensors(path: Path) -> Any:
    """torch.load on CPU, weights only, memory-mapped when the file allows it (tensors read on use)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: holds objects other than tensors and plain containers ({err})") from err


def _read_shards(tag_dir: Path, cfg: ModelConfig) -> list[dict[str, torch.Tensor]]:
    """One {neox name: tensor} dict per TP rank, from either layout."""
    pipe = [(int(m[1]), int(m[2]), f) for f in tag_dir.iterdir() if (m := _PIPE_FILE.search(f.name))]
    if pipe:
        from neox.model.pipe import pipe_to_plain_key

        tp = 1 + max(r for _, r, _ in pipe)
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        for idx, r, f in sorted(pipe):
            for sub, t in load_tensors(f).items():
                if isinstance(t, torch.Tensor):
                    shards[r][pipe_to_plain_key(idx, sub, cfg.num_layers)] = t
        return shards
    files = sorted((int(m[1]), f) for f in tag_dir.iterdir() if (m := _MP_FILE.search(f.name)))
    if not files:
        zero = list(tag_dir.glob("zero_pp_rank_*_model_states.pt"))
        hint = " (ZeRO-3 partitions weights: run DeepSpeed's zero_to_fp32.py first)" if zero else ""
        raise CheckpointError(f"{tag_dir}: no mp_rank_XX_model_states.pt files{hint}")
    shards = []
    for _, f in files:
        module = load_tensors(f).get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{f}: 'module' holds no weights and no layer_XX files are present")
        shards.append({k: v for k, v in module.items() if isinstance(v, torch.Tensor)})
    return shards


def read_full_weights(ckpt_dir: str | Path, cfg: ModelConfig) -> LazyWeights:
    """Full neox weights of a DeepSpeed checkpoint (plain or pipeline files, any TP/PP), unsharded on access.

    ``ckpt_dir`` is a ``load`` directory (with ``latest``) or a tag directory. Tensors are memory-mapped,
    so peak memory is about one full tensor per access.
    """
    tag_dir = resolve_tag_dir(ckpt_dir)
    shards = _read_shards(tag_dir, cfg)
    names = list(shards[0])
    for r, s in enumerate(shards):
        if set(s) != set(names):
            raise CheckpointError(f"{tag_dir}: TP rank {r} has different parameter names than rank 0")
    layout = model_layout(cfg)
    return LazyWeights({n: (lambda n=n: unshard([s[n] for s in shards], _split(layout, n))) for n in names})


def _split(layout: dict[str, ParamLayout], name: str) -> TensorSplit | None:
    """The declared split of ``name``; tensors the model does not have are copied to every rank."""
    return layout[name].split if name in layout else None


def _ds_states(module: dict | None, tp: int, iteration: int) -> dict[str, Any]:
    """The keys DeepSpeed's load_checkpoint reads from mp_rank_XX_model_states.pt."""
    return {"module": module, "buffer_names": [], "optimizer": None, "lr_scheduler": None,
            "sparse_tensor_module_names": [], "skipped_steps": 0, "global_steps": iteration,
            "global_samples": 0, "dp_world_size": 1, "mp_world_size": tp, "iteration": iteration}


def _checked(name: str, t: torch.Tensor, shapes: dict[str, tuple[int | None, ...]], dtype: torch.dtype | None) -> torch.Tensor:
    if name in shapes and None not in shapes[name] and tuple(t.shape) != shapes[name]:
        raise CheckpointError(f"{name}: shape {tuple(t.shape)} does not match the config's {shapes[name]}")
    return t.to(dtype) if dtype is not None else t


def write_weights(full: Mapping[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, tp: int, pp: int, *,
                  tag: str = "global_step0", dtype: torch.dtype | None = None, iteration: int = 0,
                  progress: bool = True) -> Path:
    """Write full neox weights as a DeepSpeed checkpoint ``{out_dir}/{tag}`` plus ``{out_dir}/latest``.

    ``pp == 0`` writes one ``mp_rank_XX_model_states.pt`` per TP rank (weights under ``"module"``), one
    rank at a time; ``pp >= 1`` writes ``layer_XX-model_YY-model_states.pt`` files (the file names do not
    depend on the number of stages) one layer at a time. Either loads with
    ``load_checkpoint(load_module_only=True)``. Returns the tag directory.
    """
    layout = model_layout(cfg)
    shapes = full_shapes(layout)
    missing = [n for n in shapes if n not in full]
    if missing:
        raise CheckpointError(f"weights for {out_dir}: missing {', '.join(missing[:6])}")
    tag_dir = Path(out_dir) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    start, nbytes = time.perf_counter(), 0
    bar = tqdm(total=len(full) * tp, desc=f"writing {tag_dir}", unit="tensor", disable=not progress)
    if pp == 0:
        for r in range(tp):
            module = {}
            for n in full:
                module[n] = shard_for_rank(n, _checked(n, full[n], shapes, dtype), _split(layout, n), tp, r)
                nbytes += module[n].nbytes
                bar.update()
            torch.save(_ds_states(module, tp, iteration), tag_dir / f"mp_rank_{r:02d}_model_states.pt")
            del module
    else:
        from neox.model.pipe import plain_to_pipe_key

        layers: dict[int, list[tuple[str, str]]] = {}
        for n in full:
            idx, sub = plain_to_pipe_key(n, cfg.num_layers)
            layers.setdefault(idx, []).append((n, sub))
        for idx in sorted(layers):
            tensors = {n: _checked(n, full[n], shapes, dtype) for n, _ in layers[idx]}
            for r in range(tp):
                sd = {sub: shard_for_rank(n, tensors[n], _split(layout, n), tp, r) for n, sub in layers[idx]}
                nbytes += sum(t.nbytes for t in sd.values())
                torch.save(sd, tag_dir / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
                bar.update(len(sd))
        for r in range(tp):
            torch.save(_ds_states(None, tp, iteration), tag_dir / f"mp_rank_{r:02d}_model_states.pt")
    bar.close()
    (Path(out_dir) / "latest").write_text(tag)
    secs = time.perf_counter() - start
    if progress:
        print(f"wrote {nbytes / 2**30:.2f} GiB in {secs:.1f} s ({nbytes / 2**20 / max(secs, 1e-9):.0f} MiB/s) "
              f"to {tag_dir} (tp={tp}, pp={pp})")
    return tag_dir
