"""Reliability tests run several in-process DeepSpeed engines one after another."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _forget_deepspeed_mpu():
    """An engine built with ``mpu=parallel_state`` leaves it in DeepSpeed's module globals; after the
    test destroyed the groups, a later engine built without an mpu would still ask it for them."""
    yield
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups.mpu = None
