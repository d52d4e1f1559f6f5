"""S3 upload/download against moto's S3 server on loopback, behind a proxy that injects failures.

boto3 talks HTTP to a small proxy we start here; the proxy forwards to moto's server and, when told
to, answers some requests with 500 InternalError or holds them past the client's read timeout. The
independent reference is what moto stores (listed and fetched back with a plain boto3 client).
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
import torch

from neox.checkpoint import load_checkpoint, save_checkpoint, wait_for_uploads
from neox.checkpoint import manifest as mf
from neox.checkpoint.s3 import S3Settings, S3Uploader, download_latest
from neox.checkpoint.state import TrainState
from neox.config.run import CheckpointConfig
from tests.unit.test_checkpoint import ToyArgs, init_single_rank, seed_all, toy_engine, toy_run

SECRET = "neoxSECRETdummy0123456789"
FAST = S3Settings(chunk_size=5 * 1024 * 1024, connect_timeout=1.0, read_timeout=1.0, botocore_attempts=2,
                  attempts=6, backoff_s=0.05, file_workers=2, part_workers=2)


class FaultyProxy:
    """Forwards HTTP to ``upstream``; request k (1-based) fails when ``fail(k, method, path)`` says so."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.count = 0
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, int]] = []
        self.fail = lambda k, method, path: None  # None | "500" | "hang"
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep pytest output quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _any(self) -> None:
                body = self._body()
                with proxy.lock:
                    proxy.count += 1
                    k = proxy.count
                action = proxy.fail(k, self.command, self.path)
                if action == "hang":
                    time.sleep(FAST.read_timeout + 0.5)
                    self.close_connection = True
                    return
                if action == "500":
                    err = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in ("transfer-encoding", "content-length"):
                        conn.putheader(name, value)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for name, value in resp.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(name, value)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                with proxy.lock:
                    proxy.log.append((self.command, self.path, resp.status))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def moto_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()
    server.stop()


@pytest.fixture()
def s3(moto_server, monkeypatch):
    proxy = FaultyProxy(moto_server)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # a direct client (no proxy) is the reference for what the store holds
    direct = boto3.client("s3", endpoint_url=f"http://{moto_server[0]}:{moto_server[1]}")
    bucket = f"b{time.monotonic_ns()}"
    direct.create_bucket(Bucket=bucket)
    yield proxy, direct, bucket
    try:
        proxy.close()
    except OSError:
        pass


def _fake_tag(root, tag: str, big: int) -> dict[str, bytes]:
    d = os.path.join(root, tag)
    os.makedirs(os.path.join(d, "zero"), exist_ok=True)
    files = {"mp_rank_00_model_states.pt": os.urandom(big), "zero/part.pt": b"x" * 1000, "rng_state_rank0.pt": b"r"}
    for rel, data in files.items():
        with open(os.path.join(d, rel), "wb") as f:
            f.write(data)
    mf.write_manifest(d, mf.describe_files(d, files), tag=tag)
    return files


def test_upload_survives_500s_and_timeouts_latest_last(tmp_path, s3, caplog):
    proxy, direct, bucket = s3
    files = _fake_tag(tmp_path, "global_step7", 12 * 1024 * 1024)  # 3 multipart parts
    part2_failures = []

    def fail(k: int, method: str, path: str) -> str | None:
        # the first three PUTs of part 2 fail: more than botocore's own 2 attempts, so neox's retry runs
        # whatever order the concurrent requests take; the rest: every third request fails, two hang
        if method == "PUT" and "partNumber=2" in path and len(part2_failures) < 3:
            part2_failures.append(k)
            return "500"
        return "500" if k % 3 == 0 else ("hang" if k in (2, 7) else None)

    proxy.fail = fail
    up = S3Uploader(f"s3://{bucket}/run1/", FAST)
    t0 = time.monotonic()
    with caplog.at_level("INFO"):
        up.enqueue(str(tmp_path), "global_step7")
        assert time.monotonic() - t0 < 0.5  # enqueue never waits for the network
        assert up.wait(120)
    assert up.uploaded == ["global_step7"] and up.failed == []
    for rel, data in files.items():
        got = direct.get_object(Bucket=bucket, Key=f"run1/global_step7/{rel}")["Body"].read()
        assert got == data, rel
    assert direct.get_object(Bucket=bucket, Key="run1/latest")["Body"].read() == b"global_step7"
    # 'latest' is written after every object of the tag was completed
    ok = [(m, p) for m, p, status in proxy.log if status < 300 and m in ("PUT", "POST")]
    latest_at = max(i for i, (m, p) in enumerate(ok) if p.endswith("/run1/latest"))
    tag_ops = [i for i, (m, p) in enumerate(ok) if "/global_step7/" in p]
    assert tag_ops and max(tag_ops) < latest_at
    assert any("uploadId" in p for _, p in ok)  # multipart was used
    assert len(part2_failures) == 3 and "retrying" in caplog.text and SECRET not in caplog.text


def test_permanent_failure_is_reported_not_raised(tmp_path, s3, caplog):
    proxy, direct, bucket = s3
    _fake_tag(tmp_path, "global_step1", 10)
    up = S3Uploader("s3://no-such-bucket-neox/x", FAST)
    with caplog.at_level("ERROR"):
        up.enqueue(str(tmp_path), "global_step1")
        assert up.wait(60)
    assert up.failed == ["global_step1"]
    assert "s3 upload of global_step1 to s3://no-such-bucket-neox/x failed" in caplog.text
    # an endpoint that refuses connections: retried, then reported without the endpoint URL
    proxy.close()
    caplog.clear()
    with caplog.at_level("WARNING"):
        up = S3Uploader(f"s3://{bucket}/x", dataclasses.replace(FAST, attempts=2, botocore_attempts=1))
        up.enqueue(str(tmp_path), "global_step1")
        assert up.wait(60)
    assert up.failed == ["global_step1"] and "EndpointConnectionError" in caplog.text
    assert "retrying" in caplog.text and "<endpoint>" in caplog.text
    assert SECRET not in caplog.text and proxy.url.split("//")[1] not in caplog.text


def test_resume_from_s3_url_alone(tmp_path, s3, monkeypatch):
    proxy, direct, bucket = s3
    init_single_rank()
    url = f"s3://{bucket}/run2"
    save_dir = tmp_path / "local"
    args = ToyArgs(CheckpointConfig(save=str(save_dir), s3_path=url, s3_chunk_size=5 * 1024 * 1024))
    seed_all(5)
    ref = toy_run(toy_engine(seed=0), TrainState(), 4)
    seed_all(5)
    engine, state = toy_engine(seed=0), TrainState()
    first = toy_run(engine, state, 2)
    engine.s3_uploader = S3Uploader(url, FAST)
    proxy.fail = lambda k, m, p: "500" if k % 4 == 1 else None
    save_checkpoint(engine, args.checkpoint, state, 2)
    assert wait_for_uploads(engine, 120)
    shutil.rmtree(save_dir)

    monkeypatch.setenv("NEOX_S3_CACHE", str(tmp_path / "cache"))
    proxy.fail = lambda k, m, p: "hang" if k % 5 == 2 else None  # downloads retried too
    seed_all(123)
    engine2 = toy_engine(seed=9)
    loaded = load_checkpoint(engine2, CheckpointConfig(load=url))
    assert loaded == TrainState(iteration=2, consumed_train_samples=8)
    assert torch.equal(next(engine.module.parameters()), next(engine2.module.parameters()))
    assert first + toy_run(engine2, loaded, 2) == ref
    cached = tmp_path / "cache" / bucket / "run2"
    assert (cached / "latest").read_text() == "global_step2"
    # a second download finds every file in the cache and fetches nothing but latest + manifest
    proxy.log.clear()
    proxy.fail = lambda k, m, p: None
    assert download_latest(url, str(cached), FAST) == "global_step2"
    assert all(m in ("GET", "HEAD") and ("latest" in p or "manifest" in p or "list-type" in p) for m, p, _ in proxy.log)
