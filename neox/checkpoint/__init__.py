"""Checkpoints: DeepSpeed's layout, saved crash-safely with a manifest, optionally mirrored to S3.

``save_checkpoint(engine, ck, state, iteration)`` and ``load_checkpoint(engine, ck)`` are what
the training loop calls (both are collectives: every rank calls them); ``engine`` is a
any engine with the ``engine_api.CheckpointEngine`` methods (``neox.training.engine.Engine``) and ``ck`` the run's ``CheckpointConfig``. Layout, atomicity and S3
behaviour are described in docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from neox.checkpoint import local
from neox.checkpoint.s3 import S3Settings, S3Uploader, default_cache_dir, download_latest, is_s3_url, scrub
from neox.checkpoint.state import TrainState
from neox.config.run import CheckpointConfig
from neox.errors import CheckpointError

if TYPE_CHECKING:
    from neox.checkpoint.engine_api import CheckpointEngine as Engine

log = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "wait_for_uploads", "upload_missing", "uploads_finished"]

def _uploader(engine: Engine, ck: CheckpointConfig) -> S3Uploader:
    # Kept on the engine, which lives as long as the run, rather than in a module global.
    up = engine.s3_uploader
    if up is None or up.url != ck.s3_path:
        up = S3Uploader(ck.s3_path, S3Settings(chunk_size=ck.s3_chunk_size))
        engine.s3_uploader = up
    return up


def wait_for_uploads(engine: Engine, timeout: float | None = None) -> bool:
    """Wait for queued S3 uploads of this engine's checkpoints; False if ``timeout`` ran out first."""
    up = engine.s3_uploader
    return True if up is None else up.wait(timeout)


def upload_missing(engine: Engine, ck: CheckpointConfig) -> int:
    """Queue every local tag of ``save`` for upload to ``s3_path`` unless the bucket holds all of it
    (rank 0; a no-op elsewhere or without ``s3_path``); returns how many tags were checked.

    So an upload cut short (a killed run, an outage at the end) completes on the next start.
    """
    if not (ck.s3_path and ck.save) or local._rank() != 0:
        return 0
    tags = [tag for _, tag in local.list_tags(ck.save)]
    if tags:
        up = _uploader(engine, ck)
        for tag in tags:  # oldest first, so the bucket's latest ends at the newest
            up.enqueue(ck.save, tag, only_missing=True)
        log.info("s3_path: checking %d local checkpoint(s) against %s in the background", len(tags), ck.s3_path)
    return len(tags)


def finish_uploads(engine: Engine) -> None:
    """Wait for every queued upload; raise one CheckpointError line naming each tag whose upload
    failed and the local directory that still holds it."""
    up = engine.s3_uploader
    if up is None:
        return
    if up.pending():
        print(f"neox: waiting for the upload of {', '.join(sorted(up.pending()))} to {up.url}", flush=True)
    up.wait()
    failed = [(tag, where, err) for tag, where, err in up.unfinished() if os.path.isdir(where)]
    if failed:
        tag, _, err = failed[-1]
        raise CheckpointError(
            f"s3_path {up.url}: upload of {tag} failed ({err}); not in the bucket, still only in "
            f"{', '.join(where for _, where, _ in reversed(failed))}; the next run with this save and s3_path "
            "uploads what the bucket lacks")


@contextlib.contextmanager
def uploads_finished(engine: Engine) -> Iterator[None]:
    """The body, then every S3 upload it queued: a failed upload raises (see :func:`finish_uploads`)
    unless the body itself raised, whose error is the one reported then."""
    try:
        yield
    except BaseException:
        try:
            finish_uploads(engine)
        except CheckpointError as err:
            log.error("%s", err)
        raise
    finish_uploads(engine)


def save_checkpoint(engine: Engine, ck: CheckpointConfig, state: TrainState, iteration: int, *,
                    args_flat: dict[str, Any] | None = None,
                    validation_fn: Callable[[], float] | None = None) -> str | None:
    """Save ``{save}/global_step{iteration}`` (all ranks call this); return the tag directory.

    ``args_flat`` (the run's flat config) is stored, secrets redacted, as ``neox_args.json``.
    ``validation_fn`` (a collective returning the loss of a fixed batch) is called when
    ``checkpoint_validation_with_forward_pass`` is on; its loss is stored in the manifest and
    checked by :func:`load_checkpoint`. Returns None when ``save`` is not set.
    """
    if not ck.save:
        return None
    if is_s3_url(ck.save):
        raise CheckpointError(f"save: {ck.save}: expected a local or shared directory; use s3_path to mirror to S3")
    start = time.monotonic()
    vloss = None
    if ck.checkpoint_validation_with_forward_pass and validation_fn is not None:
        vloss = local.with_rng_preserved(validation_fn)
    client = {"train_state": state.to_dict(), "iteration": int(iteration)}
    tag_dir = local.save(engine, ck.save, iteration, client_state=client, args_flat=args_flat, validation_loss=vloss,
                         save_optimizer=not ck.no_save_optim, save_rng=not ck.no_save_rng)
    if local._rank() == 0:
        protect: set[str] = set()
        if ck.s3_path:
            up = _uploader(engine, ck)
            up.enqueue(ck.save, os.path.basename(tag_dir))
            protect = up.pending()
        if ck.keep_last_n_checkpoints:
            removed = local.prune(ck.save, ck.keep_last_n_checkpoints, protect)
            if removed:
                log.info("keep_last_n_checkpoints=%d: removed %s", ck.keep_last_n_checkpoints, ", ".join(removed))
        log.info("saved checkpoint %s in %.2fs", tag_dir, time.monotonic() - start)
    return tag_dir


def _fetch_s3(url: str, save_dir: str | None) -> str:
    """Download the latest tag of ``url`` (local rank 0 of each node); return the local directory."""
    cache = default_cache_dir(url, save_dir)
    error = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            if download_latest(url, cache) is None:
                log.warning("%s: no 'latest' object; nothing to load", url)
        except CheckpointError as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 - boto errors become one line, on every rank
            error = f"{url}: download failed: {type(err).__name__}: {scrub(str(err))}"
    errors = [e for e in local._all_gather(error) if e]
    if errors:
        raise CheckpointError(errors[0])
    return cache


def load_checkpoint(engine: Engine, ck: CheckpointConfig, *,
                    validation_fn: Callable[[], float] | None = None) -> TrainState | None:
    """Load ``load`` into ``engine`` (all ranks call this); return the TrainState, or None if nothing to load.

    ``load`` is a directory with ``latest``, one of its ``global_step{N}`` directories (to pick an
    iteration), or ``s3://bucket/prefix``. With ``finetune`` only the weights are loaded and the
    returned state starts at iteration 0.
    """
    if not ck.load:
        return None
    where = _fetch_s3(ck.load, ck.save) if is_s3_url(ck.load) else ck.load
    resolved = local.resolve(where)
    if resolved is None:
        if local._rank() == 0:
            log.warning("load=%s: no checkpoint found; starting from scratch", ck.load)
        return None
    load_dir, tag = resolved
    # NEOX_CHECKPOINT_VERIFY=size skips the checksums (sizes only) where re-reading every file costs too much
    checksums = os.environ.get("NEOX_CHECKPOINT_VERIFY", "full").lower() != "size"
    client, manifest = local.load(engine, load_dir, tag, module_only=ck.finetune,
                                  load_optimizer=not ck.no_load_optim,
                                  load_rng=not (ck.no_load_rng or ck.finetune), checksums=checksums)
    if ck.finetune:
        state = TrainState()
    elif client and "train_state" in client:
        state = TrainState.from_dict(client["train_state"])
    else:  # a checkpoint written by GPT-NeoX or DeepSpeed directly
        state = TrainState(iteration=engine.global_steps)
    if ck.checkpoint_validation_with_forward_pass and validation_fn is not None and manifest:
        now = local.with_rng_preserved(validation_fn)
        local.check_validation_loss(os.path.join(load_dir, tag), manifest.get("validation_loss"), now)
    if local._rank() == 0:
        log.info("loaded %s (iteration %d%s)", os.path.join(load_dir, tag), state.iteration,
                 ", weights only" if ck.finetune else "")
    return state
