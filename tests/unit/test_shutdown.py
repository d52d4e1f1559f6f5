"""A finished CPU rank unlinks the /dev/shm buffer DeepSpeed's shared-memory all-reduce created for it
(name format from deepspeed/ops/csrc/cpu/comm/shm.cpp: prefix_uid_addr_port_rank)."""

import os

import pytest

from neox.training.engine import release_cpu_allreduce_buffer


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_own_buffer_is_unlinked_and_others_kept(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "54321")
    monkeypatch.setenv("RANK", "1")
    base = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_54321_"
    mine, other = base + "1", base + "0"
    for path in (mine, other):
        with open(path, "wb") as f:
            f.write(b"x")
    try:
        release_cpu_allreduce_buffer()
        assert not os.path.exists(mine) and os.path.exists(other)
        release_cpu_allreduce_buffer()  # already gone: no error
    finally:
        for path in (mine, other):
            if os.path.exists(path):
                os.unlink(path)
