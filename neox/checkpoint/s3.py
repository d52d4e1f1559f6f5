"""Checkpoints on S3 (or any S3-compatible store): background upload, parallel download.

Upload: after a local save commits, rank 0 hands the tag to an :class:`S3Uploader`, whose thread
uploads every file of ``{save}/{tag}`` (multipart, ``s3_chunk_size`` parts), then the tag's
``manifest.json``, then ``{prefix}/latest`` — so a prefix whose ``latest`` names a tag holds all
of that tag. Transient errors (5xx, throttling, timeouts, dropped connections) are retried by
botocore's standard retry mode and, above it, by our own loop with exponential backoff; a tag that
still fails is logged and training goes on, and the run's end reports it (``neox.checkpoint``
waits for every upload there, and a run started with ``s3_path`` first uploads the local tags the
bucket lacks).

Credentials, region and endpoint come from boto3's standard sources (``AWS_*`` environment
variables including ``AWS_ENDPOINT_URL``, ``~/.aws`` profiles, instance roles). Nothing here logs
them: log lines name only ``s3://bucket/key``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from neox.checkpoint import manifest as mf
from neox.errors import CheckpointError

log = logging.getLogger(__name__)

_PERMANENT_CODES = {"AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "InvalidBucketName", "AllAccessDisabled", "AccountProblem", "NoSuchKey", "404", "403"}


def scrub(message: str) -> str:
    """``message`` without URLs (endpoints, presigned queries), cut to one short line, for logs."""
    line = (message.splitlines() or [""])[0]
    return re.sub(r"[a-z][a-z0-9+.-]*://[^\s\"']+", lambda m: m.group(0) if m.group(0).startswith("s3://")
                  else "<endpoint>", line)[:300]


def is_s3_url(path: str | None) -> bool:
    return bool(path) and path.startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    if not is_s3_url(url):
        raise CheckpointError(f"s3_path: expected s3://bucket/prefix, got {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise CheckpointError(f"s3_path: no bucket in {url!r}; expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def _key(prefix: str, *parts: str) -> str:
    return "/".join(p for p in (prefix, *parts) if p)


@dataclass(frozen=True)
class S3Settings:
    """Client and retry settings (the defaults suit real S3; tests shorten the timeouts)."""

    chunk_size: int = 104_857_600
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    botocore_attempts: int = 5
    attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    file_workers: int = 4
    part_workers: int = 8


def make_client(settings: S3Settings) -> Any:
    """A boto3 S3 client configured from the standard sources, with timeouts and standard retries."""
    import boto3
    from botocore.config import Config

    cfg = Config(connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout,
                 retries={"max_attempts": settings.botocore_attempts, "mode": "standard"},
                 max_pool_connections=max(10, settings.file_workers * settings.part_workers))
    return boto3.session.Session().client("s3", config=cfg)


def _transfer_config(settings: S3Settings) -> Any:
    from boto3.s3.transfer import TransferConfig

    chunk = max(int(settings.chunk_size), 5 * 1024 * 1024)  # S3's smallest multipart part
    return TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk,
                          max_concurrency=settings.part_workers, use_threads=True)


def _is_permanent(err: BaseException | None) -> bool:
    from botocore.exceptions import ClientError, NoCredentialsError, ParamValidationError

    if isinstance(err, (NoCredentialsError, ParamValidationError)):
        return True
    if isinstance(err, ClientError):
        return err.response.get("Error", {}).get("Code") in _PERMANENT_CODES
    if type(err).__name__ == "S3UploadFailedError":  # boto3 wraps the ClientError it caught (the context)
        return _is_permanent(err.__cause__ or err.__context__)
    return False


def with_retries(what: str, fn: Callable[[], Any], settings: S3Settings) -> Any:
    """Call ``fn`` until it succeeds, backing off between transient failures; re-raise the last one."""
    for attempt in range(1, settings.attempts + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below, re-raised when permanent or exhausted
            if _is_permanent(err) or attempt == settings.attempts:
                raise
            delay = min(settings.backoff_s * 2 ** (attempt - 1), settings.max_backoff_s)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.1fs", what, attempt, settings.attempts,
                        type(err).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _step(tag: str | None) -> int:
    match = re.match(r"^global_step(\d+)$", tag or "")
    return int(match.group(1)) if match else -1


def points_latest(save_dir: str, tag: str) -> bool:
    """Whether an uploaded ``tag`` becomes ``{prefix}/latest``: unless the local ``latest`` has moved
    on to a newer tag (a tag uploaded late, such as an older one completed at start-up, never moves
    the bucket's ``latest`` back)."""
    try:
        with open(os.path.join(save_dir, "latest")) as f:
            local = f.read().strip()
    except FileNotFoundError:
        local = ""
    return not local or local == tag or _step(local) < _step(tag)


def _remote_complete(client: Any, bucket: str, prefix: str, tag_dir: str, tag: str, settings: S3Settings) -> bool:
    """The bucket already holds every file of ``tag_dir`` with its size, and the same manifest."""
    tag_prefix = _key(prefix, tag)
    remote: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=tag_prefix + "/"):
        remote.update({o["Key"][len(tag_prefix) + 1:]: o["Size"] for o in page.get("Contents", [])})
    if any(remote.get(rel) != os.path.getsize(os.path.join(tag_dir, rel)) for rel in mf.list_files(tag_dir)):
        return False
    manifest = os.path.join(tag_dir, mf.MANIFEST_NAME)
    if not os.path.isfile(manifest):
        return True
    if mf.MANIFEST_NAME not in remote:
        return False
    key = _key(tag_prefix, mf.MANIFEST_NAME)
    body = with_retries(f"s3://{bucket}/{key}", lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read(),
                        settings)
    with open(manifest, "rb") as f:
        return body == f.read()


def upload_tag(client: Any, save_dir: str, tag: str, url: str, settings: S3Settings, *,
               only_missing: bool = False) -> int:
    """Upload ``{save_dir}/{tag}`` to ``url``, manifest after the files, ``latest`` last; return bytes sent.

    ``only_missing``: send nothing when the bucket already holds the whole tag (its ``latest`` is
    still brought up to date). ``latest`` is written only where :func:`points_latest` says so.
    """
    bucket, prefix = parse_s3_url(url)
    tag_dir = os.path.join(save_dir, tag)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{tag_dir}: no such checkpoint directory (deleted before its upload)")
    sent = 0
    if not (only_missing and _remote_complete(client, bucket, prefix, tag_dir, tag, settings)):
        sent = _put_files(client, tag_dir, bucket, _key(prefix, tag), settings)
    if points_latest(save_dir, tag):
        latest_key = _key(prefix, "latest")
        with_retries(f"s3://{bucket}/{latest_key}",
                     lambda: client.put_object(Bucket=bucket, Key=latest_key, Body=tag.encode()), settings)
    return sent


def _put_files(client: Any, tag_dir: str, bucket: str, tag_prefix: str, settings: S3Settings) -> int:
    """Every file of ``tag_dir`` under ``tag_prefix`` (in parallel), then its manifest; bytes sent."""
    transfer = _transfer_config(settings)

    def put(rel: str) -> int:
        path, key = os.path.join(tag_dir, rel), _key(tag_prefix, rel)
        with_retries(f"s3://{bucket}/{key}", lambda: client.upload_file(path, bucket, key, Config=transfer),
                     settings)
        return os.path.getsize(path)

    with ThreadPoolExecutor(settings.file_workers) as pool:
        sent = sum(pool.map(put, mf.list_files(tag_dir)))
    if os.path.isfile(os.path.join(tag_dir, mf.MANIFEST_NAME)):
        sent += put(mf.MANIFEST_NAME)
    return sent


class S3Uploader:
    """Uploads saved tags one after another on a background thread; ``enqueue`` never blocks.

    The run must :meth:`wait` before it ends: at interpreter shutdown Python refuses the thread
    pools an upload uses ("cannot schedule new futures after interpreter shutdown").
    """

    def __init__(self, url: str, settings: S3Settings | None = None,
                 client_factory: Callable[[S3Settings], Any] = make_client) -> None:
        parse_s3_url(url)
        self.url = url
        self.settings = settings or S3Settings()
        self._client_factory = client_factory
        self._lock = threading.Lock()
        self._queue: list[tuple[str, str, bool]] = []
        self._active: str | None = None
        self._thread: threading.Thread | None = None
        self.failed: list[str] = []
        self.uploaded: list[str] = []
        self._outcome: dict[str, tuple[str, str | None]] = {}  # tag -> (save_dir, error of its last attempt)

    def enqueue(self, save_dir: str, tag: str, *, only_missing: bool = False) -> None:
        """Queue ``{save_dir}/{tag}``; ``only_missing`` skips it when the bucket already holds all of it."""
        with self._lock:
            self._queue.append((save_dir, tag, only_missing))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="neox-s3-upload", daemon=False)
                self._thread.start()

    def pending(self) -> set[str]:
        """Tags queued or uploading (their local directories must not be pruned yet)."""
        with self._lock:
            return {t for _, t, _ in self._queue} | ({self._active} if self._active else set())

    def unfinished(self) -> list[tuple[str, str, str]]:
        """``(tag, local directory, error)`` of each tag whose last upload failed, oldest step first."""
        with self._lock:
            out = [(tag, os.path.join(d, tag), err) for tag, (d, err) in self._outcome.items() if err]
        return sorted(out, key=lambda item: _step(item[0]))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                return True
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
            with self._lock:
                if self._thread is thread and not self._queue:
                    return True

    def _run(self) -> None:
        client = self._client_factory(self.settings)
        while True:
            with self._lock:
                if not self._queue:
                    self._active = None
                    return
                save_dir, tag, only_missing = self._queue.pop(0)
                self._active = tag
            self._upload_one(client, save_dir, tag, only_missing)

    def _upload_one(self, client: Any, save_dir: str, tag: str, only_missing: bool) -> None:
        start = time.monotonic()
        try:
            sent = upload_tag(client, save_dir, tag, self.url, self.settings, only_missing=only_missing)
        except Exception as err:  # noqa: BLE001 - training continues; the failure is reported
            reason = f"{type(err).__name__}: {scrub(str(err))}"
            with self._lock:
                self.failed.append(tag)
                self._outcome[tag] = (save_dir, reason)
            log.error("s3 upload of %s to %s failed after retries: %s", tag, self.url, reason)
            return
        secs = max(time.monotonic() - start, 1e-9)
        with self._lock:
            self.uploaded.append(tag)
            self._outcome[tag] = (save_dir, None)
        if sent or not only_missing:
            log.info("uploaded %s to %s: %.1f MB in %.1fs (%.1f MB/s)", tag, self.url, sent / 1e6, secs,
                     sent / 1e6 / secs)


def _download_file(client: Any, bucket: str, key: str, dest: str, settings: S3Settings) -> int:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp{socket.gethostname()}{os.getpid()}{threading.get_ident()}"
    with_retries(f"s3://{bucket}/{key}", lambda: client.download_file(bucket, key, tmp,
                                                                      Config=_transfer_config(settings)), settings)
    os.replace(tmp, dest)
    return os.path.getsize(dest)


def _read_latest(client: Any, bucket: str, prefix: str, settings: S3Settings) -> str | None:
    from botocore.exceptions import ClientError

    key = _key(prefix, "latest")
    try:
        body = with_retries(f"s3://{bucket}/{key}", lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read(),
                            settings)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    return body.decode().strip() or None


def _list_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def download_latest(url: str, cache_dir: str, settings: S3Settings | None = None,
                    client: Any = None) -> str | None:
    """Download the tag named by ``{url}/latest`` into ``cache_dir``; return the local tag or None.

    Files already in the cache with the manifest's size and checksum are not fetched again. The
    local ``latest`` is written after every file is in place and verified.
    """
    from tqdm import tqdm

    settings = settings or S3Settings()
    client = client or make_client(settings)
    bucket, prefix = parse_s3_url(url)
    tag = _read_latest(client, bucket, prefix, settings)
    if tag is None:
        return None
    tag_prefix = _key(prefix, tag)
    tag_dir = os.path.join(cache_dir, tag)
    rels = [k[len(tag_prefix) + 1:] for k in _list_keys(client, bucket, tag_prefix)]
    if not rels:
        raise CheckpointError(f"{url}/latest names {tag!r}, but s3://{bucket}/{tag_prefix}/ holds no objects")
    manifest = None
    if mf.MANIFEST_NAME in rels:
        _download_file(client, bucket, _key(tag_prefix, mf.MANIFEST_NAME),
                       os.path.join(tag_dir, mf.MANIFEST_NAME), settings)
        manifest = mf.read_manifest(tag_dir)
    else:
        log.warning("s3://%s/%s/: no %s; downloading without verification", bucket, tag_prefix, mf.MANIFEST_NAME)
    todo = [r for r in rels if r != mf.MANIFEST_NAME and (manifest is None or r not in manifest["files"]
                                                          or mf.verify_files(tag_dir, manifest, [r]))]
    start, sent = time.monotonic(), 0
    with ThreadPoolExecutor(settings.file_workers) as pool, \
            tqdm(total=len(todo), desc=f"download {tag}", unit="file", disable=not todo) as bar:
        for size in pool.map(lambda r: _download_file(client, bucket, _key(tag_prefix, r),
                                                      os.path.join(tag_dir, r), settings), todo):
            sent += size
            bar.update(1)
    if manifest is not None:
        mf.verify_tag(tag_dir)
    mf.atomic_write_text(os.path.join(cache_dir, "latest"), tag)
    secs = max(time.monotonic() - start, 1e-9)
    log.info("downloaded %s from %s: %d files, %.1f MB in %.1fs (%.1f MB/s)", tag, url, len(todo), sent / 1e6,
             secs, sent / 1e6 / secs)
    return tag


def default_cache_dir(url: str, save_dir: str | None) -> str:
    """Where ``load: s3://...`` is downloaded: $NEOX_S3_CACHE, else {save}/s3_cache, else ~/.cache/neox."""
    bucket, prefix = parse_s3_url(url)
    root = os.environ.get("NEOX_S3_CACHE") or (os.path.join(save_dir, "s3_cache") if save_dir else
                                               os.path.join(os.path.expanduser("~"), ".cache", "neox", "s3"))
    return os.path.join(root, bucket, *[p for p in prefix.split("/") if p])
