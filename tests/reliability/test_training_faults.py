"""Faults during a real (tiny) training run, in one process: NaN losses, an S3 outage, and secrets.

Every run is ``pretrain`` on a 2-layer, hidden-64 model over a char-level corpus
(tests/distributed/test_train_parity.py), a few iterations long. One run with checkpoints, metrics,
TensorBoard, W&B (offline) and an S3 mirror behind a dead endpoint serves several checks: training
goes on while the uploads fail and are reported, and no secret from the environment appears in any
file it wrote or anything it printed or logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from neox.checkpoint import local
from neox.errors import CheckpointError, NeoXError
from tests.distributed.test_train_parity import make_corpus, run_pretrain, tiny_flat
from tests.unit.test_checkpoint import init_single_rank


@pytest.fixture(scope="module", autouse=True)
def _dist():
    init_single_rank()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _pretrain(flat):
    return run_pretrain(flat, 1)


def _nan_at(monkeypatch, calls: set[int]) -> None:
    """The loss of these (1-based) training forward passes becomes NaN, as a bad batch would make it."""
    import neox.model.loss as loss_mod

    original, count = loss_mod.lm_loss, {"n": 0}

    def poisoned(logits, labels, mask):
        count["n"] += 1
        loss = original(logits, labels, mask)
        return loss * float("nan") if count["n"] in calls else loss

    monkeypatch.setattr(loss_mod, "lm_loss", poisoned)


# ---- numerics --------------------------------------------------------------------------------


def test_fp32_nan_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    # fp32 has no loss scaler: the NaN step reaches the weights, every later loss is NaN too
    _nan_at(monkeypatch, {3})
    save = tmp_path / "save"
    flat = tiny_flat(corpus, train_iters=8, max_nan_iterations=3, save=str(save), checkpoint_factor=1)
    with pytest.raises(NeoXError) as err:
        _pretrain(flat)
    msg = str(err.value)
    assert "\n" not in msg and "NaN/Inf for 3 iterations in a row (max_nan_iterations=3) at iteration 5" in msg
    # iterations 3-5 had non-finite weights: not saved; latest names the last finite one
    assert local.read_latest(str(save)) == "global_step2"
    assert sorted(p.name for p in save.iterdir()) == ["global_step1", "global_step2", "latest"]
    weights = torch.load(save / "global_step2" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_bf16_nan_is_counted_and_skipped_or_stops_per_max_nan_iterations(tmp_path, corpus, monkeypatch):
    _nan_at(monkeypatch, {3})
    flat = tiny_flat(corpus, train_iters=5, bf16={"enabled": True}, log_dir=str(tmp_path / "logs"))
    result = _pretrain(flat)  # DeepSpeed's bf16 optimizer skips a step with non-finite gradients
    assert math.isnan(result.losses[2]) and all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)
    assert (result.state.nan_iters, result.state.skipped_iters, result.state.iteration) == (1, 1, 5)
    import json

    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "split" not in r]  # training records, not evaluation
    assert records[-1]["nan_iterations"] == 1 and records[-1]["skipped_iterations"] == 1
    _nan_at(monkeypatch, {2})
    with pytest.raises(NeoXError, match=r"^loss was NaN/Inf for 1 iterations in a row \(max_nan_iterations=1\) at iteration 2"):
        _pretrain({**flat, "max_nan_iterations": 1})


def test_fp16_nan_is_skipped_by_the_loss_scaler(tmp_path, corpus, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("DeepSpeed's fp16 needs a GPU; the accounting is tested in tests/unit/test_training_loop.py")
    _nan_at(monkeypatch, {3})
    result = _pretrain(tiny_flat(corpus, train_iters=5, fp16={"enabled": True, "initial_scale_power": 8},
                                 max_nan_iterations=1))
    assert result.state.iteration == 5 and result.state.skipped_iters >= 1 and result.state.nan_iters >= 1


# ---- S3 outage and secrets, one run ----------------------------------------------------------

SECRETS = {
    "WANDB_API_KEY": "wandbkey-0123456789abcdefSECRETw",
    "AWS_SECRET_ACCESS_KEY": "awssecret-SECRETa-9876543210zyxw",
    "AWS_ACCESS_KEY_ID": "AKIASECRETIDNEOX1234",
    "AWS_SESSION_TOKEN": "sessiontoken-SECRETs-abcdef",
    "HF_TOKEN": "hf_SECRETtokenneox0123456789",
}


def test_s3_outage_and_secrets(tmp_path, corpus, monkeypatch, capfd, caplog):
    """Train 6 iterations, saving every 2 to disk and to S3 through an endpoint that refuses connections."""
    import neox.checkpoint as ckpt
    from neox.checkpoint.s3 import S3Settings, S3Uploader
    from tests.distributed.launch import free_port

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    uploaders: list[S3Uploader] = []

    class FastUploader(S3Uploader):
        def __init__(self, url, settings=None, **kw):
            fast = dataclasses.replace(settings or S3Settings(), connect_timeout=0.5, read_timeout=1.0,
                                       botocore_attempts=1, attempts=2, backoff_s=0.05, max_backoff_s=0.1)
            super().__init__(url, fast, **kw)
            uploaders.append(self)

    monkeypatch.setattr(ckpt, "S3Uploader", FastUploader)
    flat = tiny_flat(corpus, train_iters=6, save=str(tmp_path / "save"), checkpoint_factor=2,
                     keep_last_n_checkpoints=2, s3_path="s3://neox-test-bucket/run1",
                     log_dir=str(tmp_path / "logs"), tensorboard_dir=str(tmp_path / "tb"), use_wandb=True,
                     wandb_project="reliability")
    with caplog.at_level(logging.INFO):
        # training goes on through the outage; the run then ends with one line naming what is not uploaded
        with pytest.raises(CheckpointError) as failure:
            _pretrain(flat)
        assert all(up.wait(60) for up in uploaders)
    out, err = capfd.readouterr()
    text = out + err + caplog.text
    assert "\n" not in str(failure.value) and "global_step" in str(failure.value)
    assert str(tmp_path / "save") in str(failure.value)
    _check_outage(tmp_path, uploaders, text)
    _check_no_secret(tmp_path, text)


def _check_outage(tmp_path: Path, uploaders, text: str) -> None:
    """S3 outage: retried, reported per tag, training went on and the local checkpoints are whole."""
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    assert train[-1]["iteration"] == 6 and all(math.isfinite(r["lm_loss"]) for r in train)
    assert local.read_latest(str(tmp_path / "save")) == "global_step6"  # the local checkpoints are whole
    assert uploaders and sorted(t for up in uploaders for t in up.failed) == ["global_step2", "global_step4",
                                                                               "global_step6"]
    assert "retrying" in text
    assert "s3 upload of global_step6 to s3://neox-test-bucket/run1 failed after retries" in text


def _check_no_secret(tmp_path: Path, text: str) -> None:
    """No secret of the environment in any file of the run (checkpoints, metrics, TensorBoard, W&B)
    nor in what it printed or logged."""
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".pt", ".json", ".jsonl"} <= kinds and any("tfevents" in p.name for p in files)
    assert any("wandb" in str(p) for p in files)  # the offline W&B run was written
    for name, secret in SECRETS.items():
        assert secret not in text, f"{name} printed or logged"
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{name} in {path}"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRETS["AWS_SECRET_ACCESS_KEY"]  # the run really had them
