"""The end of a run with ``s3_path``: its last checkpoint reaches the bucket before the process exits,
an upload that finally fails fails the run in one line, and a restart completes an upload a killed
run left half done.

Real training runs (the 2-layer char-level model of tests/distributed/test_train_parity.py) against
moto's S3 server on loopback. The reference is what the server stores, read back with a plain boto3
client and compared byte for byte with the local checkpoint directories.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from neox.checkpoint import local
from neox.checkpoint import manifest as mf
from neox.errors import CheckpointError
from tests.distributed.test_train_parity import make_corpus, run_pretrain, tiny_flat
from tests.unit.test_checkpoint import init_single_rank

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3(endpoint, monkeypatch):
    """The environment boto3 reads (moto's endpoint, dummy keys) and a fresh bucket; the direct client."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"neox-{time.monotonic_ns()}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _assert_mirrored(client, bucket: str, prefix: str, save: Path, tags: list[str]) -> None:
    """Every file of each local tag (manifest included) is in the bucket with the same bytes."""
    for tag in tags:
        rels = mf.list_files(str(save / tag)) + [mf.MANIFEST_NAME]
        for rel in rels:
            body = client.get_object(Bucket=bucket, Key=f"{prefix}/{tag}/{rel}")["Body"].read()
            assert body == (save / tag / rel).read_bytes(), f"{tag}/{rel}"


def _keys(client, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_last_checkpoint_reaches_the_bucket_before_the_process_exits(tmp_path, corpus, s3):
    """train.py in its own process, as the launcher starts it: the final iteration's checkpoint is
    queued last, at the end of the loop, and must be in the bucket when the process has exited."""
    from neox.config import NeoXArgs
    from neox.handoff import encode_config

    client, bucket = s3
    save = tmp_path / "save"
    flat = tiny_flat(corpus, train_iters=4, checkpoint_factor=4, save=str(save), s3_path=f"s3://{bucket}/run",
                     num_gpus=1, eval_iters=0)
    resolved = NeoXArgs.from_flat(flat, world_size=1).to_flat()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--neox_args", encode_config(resolved)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "failed" not in out, out[-3000:]
    assert local.read_latest(str(save)) == "global_step4"
    _assert_mirrored(client, bucket, "run", save, ["global_step4"])
    assert client.get_object(Bucket=bucket, Key="run/latest")["Body"].read() == b"global_step4"


def test_failed_upload_fails_the_run_naming_the_step_and_its_folder(tmp_path, corpus, s3):
    init_single_rank()
    save = tmp_path / "save"
    flat = tiny_flat(corpus, train_iters=4, checkpoint_factor=4, save=str(save), eval_iters=0,
                     s3_path="s3://neox-no-such-bucket-i18/run")  # NoSuchBucket: a permanent error
    with pytest.raises(CheckpointError) as err:
        run_pretrain(flat, 1)
    message = str(err.value)
    assert "\n" not in message
    assert "global_step4" in message and str(save / "global_step4") in message and "NoSuchBucket" in message
    assert local.read_latest(str(save)) == "global_step4"  # the checkpoint itself is whole, locally


def test_restart_completes_an_upload_a_killed_run_left_half_done(tmp_path, corpus, s3):
    """Local global_step2 and global_step4; the bucket has all of step 2 but only one file of step 4
    (the run was killed while uploading it). The next run with s3_path uploads the rest of step 4."""
    init_single_rank()
    client, bucket = s3
    save = tmp_path / "save"
    # one LR schedule for both runs (decay over 6), so the restart resumes it unchanged
    common = dict(checkpoint_factor=2, save=str(save), eval_iters=0, lr_decay_iters=6)
    run_pretrain(tiny_flat(corpus, train_iters=4, **common), 1)
    assert [t for _, t in local.list_tags(str(save))] == ["global_step2", "global_step4"]
    for rel in mf.list_files(str(save / "global_step2")) + [mf.MANIFEST_NAME]:
        client.upload_file(str(save / "global_step2" / rel), bucket, f"run/global_step2/{rel}")
    client.put_object(Bucket=bucket, Key="run/latest", Body=b"global_step2")
    client.upload_file(str(save / "global_step4" / "rng_state_rank0.pt"), bucket, "run/global_step4/rng_state_rank0.pt")

    run_pretrain(tiny_flat(corpus, train_iters=6, s3_path=f"s3://{bucket}/run", **common), 1)
    tags = ["global_step2", "global_step4", "global_step6"]
    assert [t for _, t in local.list_tags(str(save))] == tags
    _assert_mirrored(client, bucket, "run", save, tags)
    assert client.get_object(Bucket=bucket, Key="run/latest")["Body"].read() == b"global_step6"
    assert all(k.startswith(("run/global_step", "run/latest")) for k in _keys(client, bucket))
