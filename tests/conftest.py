"""Shared test settings: CPU threads kept low so the suite runs well on 2 cores."""

import contextlib
import glob
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords or "tests/gpu" in str(item.fspath):
            item.add_marker(skip)


def pytest_sessionstart(session):
    session.config._neox_shm_before = set(glob.glob(SHM_BUFFERS))


def pytest_sessionfinish(session, exitstatus):
    """Remove DeepSpeed CPU all-reduce buffers this session's runs left in /dev/shm (69 MB each):
    ranks that were killed, or spawned children that exit without atexit, cannot unlink their own."""
    for path in set(glob.glob(SHM_BUFFERS)) - getattr(session.config, "_neox_shm_before", set()):
        with contextlib.suppress(OSError):
            os.unlink(path)
