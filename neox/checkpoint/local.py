"""Saving and loading DeepSpeed checkpoints on a (shared) filesystem, crash-safely.

A save writes every rank's files into ``{save}/global_step{N}.partial`` through
``engine.save_checkpoint``, adds each rank's RNG state, fsyncs, and only after a barrier does
rank 0 write the manifest, rename the directory to ``global_step{N}`` and atomically replace
``latest``. A process killed at any point before that leaves the previous tag and ``latest``
untouched; the loader never follows ``latest`` to a directory without a complete manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from neox.checkpoint import manifest as mf
from neox.checkpoint.rng import get_rng_state, load_rng_state, save_rng_state, set_rng_state
from neox.errors import CheckpointError

if TYPE_CHECKING:
    from neox.checkpoint.engine_api import CheckpointEngine as Engine

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^global_step(\d+)$")
PARTIAL_SUFFIX = ".partial"
ARGS_NAME = "neox_args.json"
CLIENT_KEY = "neox"
_SECRET_RE = re.compile(r"(^|_)(api_key|secret|secret_key|access_key|password|passwd|token|credentials?|auth)(_|$)")
_VALIDATION_RTOL = 1e-3


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def redact(flat: dict[str, Any]) -> dict[str, Any]:
    """The flat config with secret-looking values replaced, safe to store next to the weights."""
    out = {}
    for key, value in flat.items():
        if _SECRET_RE.search(key.lower()) and value not in (None, ""):
            out[key] = "<redacted>"
        elif isinstance(value, str):
            out[key] = re.sub(r"://[^/@\s]+@", "://<redacted>@", value)
        else:
            out[key] = value
    return out


def engine_layout(engine: Engine) -> dict[str, int]:
    """World, data-, tensor- and pipeline-parallel sizes and ZeRO stage of ``engine``."""
    return engine.layout(_world())


def _fsync_written(root: str, written: list[str] | None) -> None:
    """fsync what this rank wrote (every file when unknown) and the directories holding it."""
    if written is None:
        written = [os.path.join(d, f) for d, _s, files in os.walk(root) for f in files]
    for path in written:
        if path and os.path.isfile(path):
            mf.fsync_path(path)
    for dirpath, _dirs, _files in os.walk(root):
        mf.fsync_path(dirpath)


def _hash_shared(tag_dir: str) -> dict[str, dict]:
    """Checksums of every file of ``tag_dir``, the work split over all ranks (a collective)."""
    files = _broadcast(mf.list_files(tag_dir) if _rank() == 0 else None)
    mine = files[_rank()::_world()]
    described: dict[str, dict] = {}
    for part in _all_gather(mf.describe_files(tag_dir, mine)):
        described.update(part)
    return described


def with_rng_preserved(fn: Callable[[], float]) -> float:
    """Call ``fn`` and put every RNG back as it was, so validation never shifts training randomness."""
    state = get_rng_state()
    try:
        return float(fn())
    finally:
        set_rng_state(state)


def save(engine: Engine, save_dir: str, iteration: int, *, client_state: dict[str, Any],
         args_flat: dict[str, Any] | None = None, validation_loss: float | None = None,
         save_optimizer: bool = True, save_rng: bool = True) -> str:
    """Save one crash-safe checkpoint tag (a collective); return the final tag directory.

    ``save_optimizer=False`` (NeoX's no_save_optim) drops the optimizer state: ZeRO's optim files
    are removed and the non-ZeRO ``optimizer`` entry is stored as None; the manifest records it.
    """
    tag = tag_for(iteration)
    partial = tag + PARTIAL_SUFFIX
    partial_dir = os.path.join(save_dir, partial)
    error = None
    if _rank() == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
        except OSError as err:  # read-only or unwritable: every rank raises below
            error = f"rank 0: {type(err).__name__}: {err}"
        shutil.rmtree(partial_dir, ignore_errors=True)  # left by a save that crashed
    _fail_save(save_dir, partial_dir, [e for e in _all_gather(error) if e])
    extra = {} if save_optimizer else {"optimizer": None}  # DeepSpeed lets client_state override its keys
    try:
        written = engine.save_checkpoint(save_dir, partial, {CLIENT_KEY: client_state, **extra})
        if save_rng:
            save_rng_state(partial_dir, _rank())  # fsynced there
        if _rank() == 0 and args_flat is not None:
            with open(os.path.join(partial_dir, ARGS_NAME), "w") as f:
                json.dump(redact(args_flat), f, indent=1, sort_keys=True, default=str)
            if written is not None:
                written.append(os.path.join(partial_dir, ARGS_NAME))
        _fsync_written(partial_dir, written)
    except (OSError, RuntimeError) as err:  # disk full, quota, I/O error (torch's writer raises RuntimeError)
        error = f"rank {_rank()}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
    # every rank's files are on disk, or every rank learns that one could not write them
    _fail_save(save_dir, partial_dir, [e for e in _all_gather(error) if e])
    if not save_optimizer and _rank() == 0:
        for name in os.listdir(partial_dir):
            if name.endswith("optim_states.pt"):
                os.remove(os.path.join(partial_dir, name))
    files = _hash_shared(partial_dir)
    final_dir = os.path.join(save_dir, tag)
    error = None
    if _rank() == 0:
        try:
            mf.write_manifest(partial_dir, files, tag=tag, iteration=iteration, layout=engine_layout(engine),
                              optimizer=save_optimizer, validation_loss=validation_loss)
            _commit(save_dir, tag)
        except OSError as err:
            error = f"rank 0: {type(err).__name__}: {err}"
    _fail_save(save_dir, partial_dir, [e for e in _all_gather(error) if e])
    return final_dir


def _fail_save(save_dir: str, partial_dir: str, errors: list[str]) -> None:
    """After a failed write: remove the partial tag (freeing its space) and raise a one-line error."""
    if not errors:
        return
    free = shutil.disk_usage(save_dir).free if os.path.isdir(save_dir) else 0
    # DeepSpeed swallows its own makedirs error; torch then only says the directory does not exist
    unwritable = "; the directory is not writable" if os.path.isdir(save_dir) and not os.access(save_dir, os.W_OK) else ""
    if _rank() == 0:
        shutil.rmtree(partial_dir, ignore_errors=True)
    _barrier()
    latest = read_latest(save_dir)
    raise CheckpointError(
        f"save: {partial_dir}: writing the checkpoint failed ({errors[0]}; {free} bytes free on that filesystem"
        f"{unwritable}); "
        f"removed the partial save, latest still names {latest or 'no checkpoint'}")


def _commit(save_dir: str, tag: str) -> None:
    """Rename ``{tag}.partial`` to ``{tag}`` and point ``latest`` at it (rank 0 only)."""
    final_dir = os.path.join(save_dir, tag)
    old_dir = final_dir + ".old"
    if os.path.exists(final_dir):  # re-saving an iteration: move the old copy aside first
        shutil.rmtree(old_dir, ignore_errors=True)
        os.replace(final_dir, old_dir)
    os.replace(final_dir + PARTIAL_SUFFIX, final_dir)
    mf.fsync_path(save_dir)
    mf.atomic_write_text(os.path.join(save_dir, "latest"), tag)
    shutil.rmtree(old_dir, ignore_errors=True)


def read_latest(load_dir: str) -> str | None:
    path = os.path.join(load_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def list_tags(save_dir: str) -> list[tuple[int, str]]:
    """Complete-looking ``global_step{N}`` directories of ``save_dir`` as (N, tag), oldest first."""
    if not os.path.isdir(save_dir):
        return []
    out = []
    for name in os.listdir(save_dir):
        m = TAG_RE.match(name)
        if m and os.path.isdir(os.path.join(save_dir, name)):
            out.append((int(m.group(1)), name))
    return sorted(out)


def prune(save_dir: str, keep: int, protect: set[str] = frozenset()) -> list[str]:
    """Delete all but the newest ``keep`` tags, never the one ``latest`` names nor ``protect``."""
    if keep is None or keep < 1:
        return []
    latest = read_latest(save_dir)
    tags = [t for _, t in list_tags(save_dir)]
    removed = []
    for tag in tags[:-keep]:
        if tag == latest or tag in protect:
            continue
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
        removed.append(tag)
    return removed


def resolve(load: str) -> tuple[str, str] | None:
    """``(load_dir, tag)`` for a ``load`` value: a directory with ``latest`` or a tag directory itself."""
    load = os.path.abspath(load.rstrip("/"))
    if load.endswith(PARTIAL_SUFFIX):
        raise CheckpointError(f"load: {load} is an interrupted save (no manifest); load its parent directory")
    if TAG_RE.match(os.path.basename(load)):
        if not os.path.isdir(load):
            raise CheckpointError(f"load: {load} does not exist")
        return os.path.dirname(load), os.path.basename(load)
    if not os.path.isdir(load):
        return None
    tag = read_latest(load)
    if tag is None:
        if list_tags(load):
            log.warning("%s: has global_step directories but no 'latest' file; pass one of them as load",
                        load)
        return None
    if "/" in tag or os.sep in tag or tag in (".", ".."):  # a tag is a directory name inside load
        raise CheckpointError(f"{os.path.join(load, 'latest')}: names {tag!r}, expected a tag such as 'global_step1000'")
    if not os.path.isdir(os.path.join(load, tag)):
        raise CheckpointError(f"{os.path.join(load, 'latest')}: names {tag!r}, but {os.path.join(load, tag)} "
                              "does not exist")
    return load, tag


def verify_shared(tag_dir: str, checksums: bool = True) -> dict[str, Any] | None:
    """Check ``tag_dir`` against its manifest, the work split over ranks; raise on any problem."""
    manifest = mf.read_manifest(tag_dir)
    if manifest is None:
        return None
    files = sorted(manifest["files"])
    mine = files[_rank()::_world()]
    problems = sorted(p for part in _all_gather(mf.verify_files(tag_dir, manifest, mine, checksums=checksums))
                      for p in part)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    return manifest


def check_pickles_shared(tag_dir: str) -> None:
    """Refuse ``.pt`` files whose pickle names code other than tensor, NumPy or DeepSpeed state (a collective)."""
    if os.environ.get("NEOX_TRUST_CHECKPOINT") == "1":
        return
    files = [n for n in mf.list_files(tag_dir) if n.endswith(".pt")]
    problems = sorted(p for part in _all_gather(mf.pickle_problems(tag_dir, files[_rank()::_world()])) for p in part)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


_SHAPE_RE = re.compile(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) "
                       r"from checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]*\]\))")


def _ds_load(engine: Engine, load_dir: str, tag: str, *, universal: bool = False, **kw: Any) -> dict[str, Any]:
    """``engine.load_checkpoint`` with torch's shape errors turned into one-line CheckpointErrors."""
    try:
        if universal:
            path, client = engine.load_universal_checkpoint(load_dir, tag)
        else:
            path, client = engine.load_checkpoint(load_dir, tag, **kw)
    except RuntimeError as err:
        m = _SHAPE_RE.search(str(err))
        if m:
            raise CheckpointError(f"{os.path.join(load_dir, tag)}: tensor {m.group(1)} has shape {m.group(2)[11:-1]} "
                                  f"in the checkpoint but {m.group(3)[11:-1]} in the model") from err
        if "Missing key(s)" in str(err) or "Unexpected key(s)" in str(err):
            first = " ".join(str(err).split())[:400]
            raise CheckpointError(f"{os.path.join(load_dir, tag)}: model and checkpoint differ: {first}") from err
        raise
    except (FileNotFoundError, AttributeError, TypeError) as err:
        # DeepSpeed's way of saying the checkpoint has no optimizer state (e.g. converted weights)
        if not kw.get("load_optimizer_states", True) or kw.get("load_module_only"):
            raise
        raise CheckpointError(f"{os.path.join(load_dir, tag)}: no usable optimizer state ({type(err).__name__}: "
                              f"{str(err)[:200]}); set finetune: true (weights only) or no_load_optim: true") from err
    if path is None:
        raise CheckpointError(f"{os.path.join(load_dir, tag)}: DeepSpeed found no model states file for this rank")
    return client or {}


def _needs_module_only(engine: Engine, manifest: dict[str, Any] | None) -> str | None:
    """Why the optimizer state cannot be loaded into ``engine`` (None: it can)."""
    if manifest is None or "layout" not in manifest:
        return None
    if manifest.get("optimizer") is False:
        return "saved without optimizer state (no_save_optim)"
    saved, now = manifest["layout"], engine_layout(engine)
    if saved.get("zero_stage") != now["zero_stage"]:
        return f"ZeRO stage {saved.get('zero_stage')} in the checkpoint, {now['zero_stage']} now"
    if now["zero_stage"] > 0 and saved.get("data_parallel_size") != now["data_parallel_size"]:
        return (f"ZeRO-partitioned optimizer state saved at data-parallel size {saved.get('data_parallel_size')}, "
                f"loading at {now['data_parallel_size']}")
    return None


_MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")


def saved_layout(tag_dir: str) -> tuple[int, bool] | None:
    """(tensor-parallel size, pipeline format) as the tag's file names show it; None without model files."""
    names = os.listdir(tag_dir)
    layer_tp = [int(m.group(2)) for n in names if (m := _LAYER_FILE.match(n))]
    if layer_tp:
        return max(layer_tp) + 1, True
    mp = [int(m.group(1)) for n in names if (m := _MP_FILE.match(n))]
    return (max(mp) + 1, False) if mp else None


def check_layout(engine: Engine, tag_dir: str) -> None:
    """Refuse a checkpoint of another tensor-parallel size or module format before DeepSpeed reads it
    (DeepSpeed would fail deep inside with an unrelated AssertionError or TypeError)."""
    saved = saved_layout(tag_dir)
    if saved is None:
        return
    now = (engine.tensor_parallel_size, engine.is_pipeline)
    if saved != now:
        def kind(pipe: bool) -> str:
            return "pipeline (pipe_parallel_size >= 1)" if pipe else "plain (pipe_parallel_size 0)"

        raise CheckpointError(
            f"{tag_dir}: saved with model_parallel_size {saved[0]} as a {kind(saved[1])} model, but this run has "
            f"model_parallel_size {now[0]} and a {kind(now[1])} model; convert it with "
            f"tools/reshard_checkpoint.py --num_output_shards {now[0]} --pipe_parallel_size {1 if now[1] else 0}")


def load(engine: Engine, load_dir: str, tag: str, *, module_only: bool = False, load_optimizer: bool = True,
         load_rng: bool = True, checksums: bool = True) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Load ``{load_dir}/{tag}`` into ``engine`` (a collective).

    Returns ``(client_state, manifest)``; client_state is what ``save`` was given, or None for a
    weights-only load (``module_only``) or a checkpoint not written by neox.
    """
    tag_dir = os.path.join(load_dir, tag)
    manifest = verify_shared(tag_dir, checksums=checksums)
    check_layout(engine, tag_dir)
    check_pickles_shared(tag_dir)
    if module_only:
        with _latest_view(engine, load_dir, tag) as view_dir:
            _ds_load(engine, view_dir, tag, load_module_only=True, load_optimizer_states=False,
                     load_lr_scheduler_states=False)
        return None, manifest
    reason = _needs_module_only(engine, manifest) if load_optimizer else None
    if reason is not None:
        client = _load_universal(engine, load_dir, tag, reason) if _universal_ok(engine, manifest) else None
        if client is None:
            client = _load_without_optimizer(engine, load_dir, tag, reason)
    else:
        client = _ds_load(engine, load_dir, tag, load_optimizer_states=load_optimizer)
    if load_rng:
        _restore_rng(tag_dir, manifest)
    return client.get(CLIENT_KEY), manifest


@contextlib.contextmanager
def _latest_view(engine: Engine, load_dir: str, tag: str) -> Iterator[str]:
    """A directory whose ``latest`` names ``tag`` (yields ``load_dir`` when it already does).

    DeepSpeed's ZeRO-3 weights-only load re-reads the fp32 weights from ``{load_dir}/latest``,
    ignoring the tag it was given; a symlinked view makes a chosen older tag load correctly.
    """
    if engine.zero_optimization_stage() < 3 or read_latest(load_dir) == tag:
        yield load_dir
        return
    view = None
    if _rank() == 0:
        try:
            view = os.path.join(load_dir, f".{tag}.view")
            shutil.rmtree(view, ignore_errors=True)
            os.makedirs(view)
        except OSError:  # read-only load dir: a private temp dir (ranks of one node only)
            view = tempfile.mkdtemp(prefix=f"neox-{tag}-")
        os.symlink(os.path.abspath(os.path.join(load_dir, tag)), os.path.join(view, tag))
        mf.atomic_write_text(os.path.join(view, "latest"), tag)
    view = _broadcast(view)
    try:
        yield view
    finally:
        _barrier()
        if _rank() == 0:
            shutil.rmtree(view, ignore_errors=True)


def _universal_ok(engine: Engine, manifest: dict[str, Any] | None) -> bool:
    """Whether DeepSpeed's universal checkpoint can reshard this ZeRO-1/2 optimizer state.

    Only without tensor or pipeline parallelism: the converter would need DeepSpeed's
    universal-checkpoint description of our TP-sliced parameters, which the model does not declare.
    """
    if manifest is None or manifest.get("optimizer") is False:
        return False
    saved, now = manifest["layout"], engine_layout(engine)
    pipe_files = any(name.startswith("layer_") for name in manifest["files"])
    return (saved.get("zero_stage") in (1, 2) and now["zero_stage"] in (1, 2) and not pipe_files
            and saved.get("model_parallel_size") == 1 and now["model_parallel_size"] == 1
            and not engine.is_pipeline)


def _load_universal(engine: Engine, load_dir: str, tag: str, reason: str) -> dict[str, Any] | None:
    """Reshard the ZeRO optimizer state through DeepSpeed's universal checkpoint; None if that failed."""
    # The converter also writes 'latest_universal' next to its output: keep both in a scratch dir.
    scratch = os.path.join(load_dir, f".{tag}.universal")
    tag_dir, out = os.path.join(load_dir, tag), os.path.join(scratch, tag)
    error = None
    if _rank() == 0:
        log.warning("%s: %s; converting to DeepSpeed's universal checkpoint to reshard the optimizer state",
                    tag_dir, reason)
        shutil.rmtree(scratch, ignore_errors=True)
        proc = subprocess.run(engine.universal_conversion_command(tag_dir, out), capture_output=True, text=True)
        if proc.returncode != 0:
            error = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]
    errors = [e for e in _all_gather(error) if e]
    client = None
    if not errors:
        client = _ds_load(engine, scratch, tag, universal=True)
    elif _rank() == 0:
        log.warning("%s: universal-checkpoint conversion failed (%s)", tag_dir, errors[0][0])
    _barrier()
    if _rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    return client


def _load_without_optimizer(engine: Engine, load_dir: str, tag: str, reason: str) -> dict[str, Any]:
    """Weights, LR schedule and step count, with a fresh optimizer (its state could not be resharded)."""
    if _rank() == 0:
        log.warning("%s: %s; DeepSpeed cannot reshard that optimizer state, so the weights, LR schedule "
                    "and iteration are loaded and the optimizer starts fresh (moments reset)",
                    os.path.join(load_dir, tag), reason)
    with _latest_view(engine, load_dir, tag) as view_dir:
        client = _ds_load(engine, view_dir, tag, load_module_only=True, load_optimizer_states=False,
                          load_lr_scheduler_states=False)
    if engine.lr_scheduler is not None and client.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(client["lr_scheduler"])
    engine.restore_counters(client)
    return client


def _restore_rng(tag_dir: str, manifest: dict[str, Any] | None) -> None:
    saved_world = (manifest or {}).get("layout", {}).get("world_size")
    if saved_world is not None and saved_world != _world():
        if _rank() == 0:
            log.warning("%s: saved with %d ranks, loading with %d: RNG states not restored", tag_dir,
                        saved_world, _world())
        return
    if not load_rng_state(tag_dir, _rank()) and _rank() == 0:
        log.warning("%s: no rng_state_rank*.pt files (not a neox checkpoint?): RNG states not restored", tag_dir)


def check_validation_loss(tag_dir: str, saved: float | None, now: float) -> None:
    """Raise CheckpointError when the recomputed fixed-batch loss differs from the saved one."""
    if saved is None:
        return
    if not math.isclose(saved, now, rel_tol=_VALIDATION_RTOL, abs_tol=1e-6):
        raise CheckpointError(f"{tag_dir}: checkpoint_validation_with_forward_pass: loss of the fixed batch was "
                              f"{saved!r} at save, {now!r} after load")

