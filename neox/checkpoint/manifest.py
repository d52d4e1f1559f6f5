"""The manifest written into every checkpoint tag: files, sizes and checksums, plus the layout.

``{save}/global_step{N}/manifest.json``::

    {"format": 1, "tag": "global_step100", "iteration": 100,
     "layout": {"world_size": 2, "data_parallel_size": 2, "model_parallel_size": 1,
                "pipe_parallel_size": 1, "zero_stage": 1},
     "files": {"mp_rank_00_model_states.pt": {"size": 1234, "xxh3_128": "..."}, ...},
     "validation_loss": 2.31}

The checksum is xxHash3-128 when ``xxhash`` is importable (several GB/s) and BLAKE2b otherwise;
the key names the algorithm, so a reader checks whichever the writer used. The manifest is
written last (after every rank's files are on disk), so a tag directory without one is
incomplete.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Iterable
from typing import Any

from neox.errors import CheckpointError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 << 20


def _hasher(algo: str):
    if algo == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    if algo == "blake2b":
        return hashlib.blake2b(digest_size=16)
    raise CheckpointError(f"manifest: unknown checksum algorithm {algo!r}; expected 'xxh3_128' or 'blake2b'")


def default_algorithm() -> str:
    """``xxh3_128`` when xxhash is installed, else ``blake2b``."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "blake2b"
    return "xxh3_128"


def file_checksum(path: str, algo: str | None = None) -> str:
    """Hex digest of ``path`` with ``algo`` (default: :func:`default_algorithm`)."""
    h = _hasher(algo or default_algorithm())
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(tag_dir: str) -> list[str]:
    """Every regular file under ``tag_dir`` (relative, '/'-separated, sorted), the manifest excluded."""
    out = []
    for root, _dirs, files in os.walk(tag_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), tag_dir).replace(os.sep, "/")
            if rel != MANIFEST_NAME and ".tmp" not in name:
                out.append(rel)
    return sorted(out)


def describe_files(tag_dir: str, rel_paths: Iterable[str], algo: str | None = None) -> dict[str, dict]:
    """``{rel: {"size": bytes, algo: digest}}`` for the given files of ``tag_dir``."""
    algo = algo or default_algorithm()
    out = {}
    for rel in rel_paths:
        path = os.path.join(tag_dir, rel)
        out[rel] = {"size": os.path.getsize(path), algo: file_checksum(path, algo)}
    return out


def fsync_path(path: str) -> None:
    """fsync a file or directory so it survives a power loss or node crash."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write_manifest(tag_dir: str, files: dict[str, dict], **meta: Any) -> str:
    """Write ``manifest.json`` into ``tag_dir`` atomically; return its path."""
    body = {"format": FORMAT_VERSION, **meta, "files": dict(sorted(files.items()))}
    path = os.path.join(tag_dir, MANIFEST_NAME)
    atomic_write_text(path, json.dumps(body, indent=1, sort_keys=False) + "\n")
    return path


def read_manifest(tag_dir: str) -> dict[str, Any] | None:
    """The manifest of ``tag_dir``, or None when it has none (a checkpoint not written by neox)."""
    path = os.path.join(tag_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"{path}: expected a JSON object with a 'files' mapping")
    return data


def verify_files(tag_dir: str, manifest: dict[str, Any], rel_paths: Iterable[str] | None = None,
                 *, checksums: bool = True) -> list[str]:
    """Problems found checking ``tag_dir`` against ``manifest`` (empty: all good).

    Each problem is one line naming the file and what differs. ``rel_paths`` limits the check to
    some files (e.g. the ones this rank reads); ``checksums=False`` checks presence and size only.
    """
    files = manifest["files"]
    problems = []
    for rel in sorted(rel_paths if rel_paths is not None else files):
        entry = files.get(rel)
        path = os.path.join(tag_dir, rel)
        if entry is None:
            problems.append(f"{path}: not listed in the manifest")
            continue
        if not os.path.isfile(path):
            problems.append(f"{path}: missing (manifest lists {entry['size']} bytes)")
            continue
        size = os.path.getsize(path)
        if size != entry["size"]:
            problems.append(f"{path}: size {size} bytes, manifest says {entry['size']}")
            continue
        if checksums:
            algo = next((k for k in entry if k != "size"), None)
            if algo is None:
                continue
            digest = file_checksum(path, algo)
            if digest != entry[algo]:
                problems.append(f"{path}: {algo} checksum {digest}, manifest says {entry[algo]}")
    return problems


def verify_tag(tag_dir: str, *, checksums: bool = True) -> dict[str, Any] | None:
    """Check every file of ``tag_dir`` against its manifest; raise CheckpointError on the first problem.

    Returns the manifest, or None when the directory has none.
    """
    manifest = read_manifest(tag_dir)
    if manifest is None:
        return None
    problems = verify_files(tag_dir, manifest, checksums=checksums)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    return manifest


# Pickled names a checkpoint may hold besides tensors and containers: NumPy's RNG state array, and
# classes (never functions) defined in DeepSpeed or torch, e.g. ZeRO's ZeroStageEnum or LossScaler.
_NUMPY_STATE = {"numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct",
                "numpy.core.multiarray._reconstruct", "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar"}
_TRUSTED_PACKAGES = ("deepspeed", "torch")
# plain containers older Megatron/GPT-NeoX/DeepSpeed checkpoints pickle (their arguments are checked on their own)
_PLAIN_CLASSES = {"argparse.Namespace", "collections.defaultdict", "builtins.frozenset", "builtins.slice",
                  "builtins.range", "builtins.list", "builtins.dict", "builtins.tuple", "builtins.int",
                  "builtins.float", "builtins.str", "builtins.bool"}


def _trusted_class(name: str) -> bool:
    parts = name.split(".")
    if parts[0] not in _TRUSTED_PACKAGES:
        return False  # never import a module an untrusted file names
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return isinstance(obj, type) and obj.__module__.split(".")[0] in _TRUSTED_PACKAGES
    return False


def pickle_problems(tag_dir: str, rel_paths: Iterable[str]) -> list[str]:
    """One line per ``.pt`` file whose pickle names a global other than the allowed ones.

    DeepSpeed unpickles its files with ``weights_only=False`` (they hold its own classes), which
    would run any callable a crafted file names; this static scan (torch's
    ``get_unsafe_globals_in_checkpoint``) refuses such files before DeepSpeed opens them.
    """
    import torch

    problems = []
    for rel in sorted(rel_paths):
        if not rel.endswith(".pt"):
            continue
        path = os.path.join(tag_dir, rel)
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as err:  # noqa: BLE001 - any failure to parse is the file's fault
            problems.append(f"{path}: not a readable torch.save file ({type(err).__name__}: {err})")
            continue
        bad = sorted(n for n in names if n not in _NUMPY_STATE and n not in _PLAIN_CLASSES
                     and not n.startswith("numpy.dtypes.") and not _trusted_class(n))
        if bad:
            problems.append(f"{path}: the pickle names {', '.join(bad[:3])}, which is not tensor, NumPy or "
                            "DeepSpeed state; refusing to unpickle it (NEOX_TRUST_CHECKPOINT=1 if you trust the file)")
    return problems
