"""Sliding-window attention on a GPU: flash-attn's window (when installed) and SDPA's banded mask in
bf16 against the fp32 hand-written reference of tests/unit/test_sliding_window.py."""

import pytest
import torch

from neox.model.attention import _sdpa
from neox.model.flash import FA2, flash_attention, flash_kernel
from tests.unit.test_sliding_window import _reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _qkv(s: int = 256):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, s, 64, device="cuda", generator=g)
    return q, torch.randn(2, 2, s, 64, device="cuda", generator=g), torch.randn(2, 2, s, 64, device="cuda", generator=g)


@pytest.mark.parametrize("window", [16, 100])
def test_sdpa_banded_mask_bf16(window):
    q, k, v = _qkv()
    ref = _reference(q, k, v, window)
    out = _sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.0, window).float()
    assert (out - ref).abs().max().item() < 3e-2


@pytest.mark.skipif(flash_kernel() != FA2, reason="needs FlashAttention-2 (FA4 runs windows through SDPA)")
@pytest.mark.parametrize("window", [16, 100])
def test_flash_attn_window_matches_the_reference(window):
    q, k, v = _qkv()
    ref = _reference(q, k, v, window)
    out = flash_attention(FA2, *(t.bfloat16().transpose(1, 2) for t in (q, k, v)), 0.0, window).transpose(1, 2).float()
    assert (out - ref).abs().max().item() < 3e-2
