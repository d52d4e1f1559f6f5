"""Which FlashAttention package the ``flash`` backend picks (neox/model/flash.py), for each combination
of installed packages and GPU generation, and which calls fall back to SDPA."""

import pytest
import torch

from neox.model import flash


@pytest.mark.parametrize("installed, capability, expected", [
    ((), (9, 0), None),
    (("flash_attn", "flash_attn.flash_attn_interface"), (8, 0), flash.FA2),
    (("flash_attn", "flash_attn.flash_attn_interface"), (9, 0), flash.FA2),
    (("flash_attn", "flash_attn.cute"), (9, 0), flash.FA4),
    (("flash_attn", "flash_attn.cute"), (10, 0), flash.FA4),
    (("flash_attn", "flash_attn.cute", "flash_attn.flash_attn_interface"), (9, 0), flash.FA4),
    (("flash_attn", "flash_attn.cute", "flash_attn.flash_attn_interface"), (8, 6), flash.FA2),
    # flash-attn-4 alone on an Ampere card: flash_attn/ is a namespace package without FA2 in it
    (("flash_attn", "flash_attn.cute"), (8, 0), None),
    (("flash_attn", "flash_attn.cute"), None, None),  # no GPU
])
def test_flash_kernel_choice(monkeypatch, installed, capability, expected):
    monkeypatch.setattr(flash, "_has", lambda name: name in installed)
    monkeypatch.setattr(flash, "_fa4_imports", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert flash.flash_kernel() == expected


def test_an_fa4_that_does_not_import_falls_back_to_fa2(monkeypatch, caplog):
    installed = ("flash_attn", "flash_attn.cute", "flash_attn.flash_attn_interface")
    monkeypatch.setattr(flash, "_has", lambda name: name in installed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    flash._fa4_imports.cache_clear()
    monkeypatch.setattr(flash.importlib, "import_module", lambda name: (_ for _ in ()).throw(ModuleNotFoundError("cutlass")))
    try:
        assert flash.flash_kernel() == flash.FA2
    finally:
        flash._fa4_imports.cache_clear()
    assert "does not import" in caplog.text


def test_fa4_falls_back_for_what_it_lacks():
    assert flash.supports(flash.FA4, 0.0, None, 64) and flash.supports(flash.FA4, 0.0, None, 128)
    assert not flash.supports(flash.FA4, 0.1, None, 64)  # no dropout in FA4
    assert not flash.supports(flash.FA4, 0.0, 128, 64)  # windows go to SDPA's banded mask
    assert not flash.supports(flash.FA4, 0.0, None, 80)  # a head size FA4 has not run at here
    assert flash.supports(flash.FA2, 0.1, 128, 80)
    assert not flash.supports(None, 0.0, None, 64)


def test_has_survives_a_broken_parent_package(monkeypatch):
    def broken(name):
        raise ImportError("flash_attn_2_cuda: undefined symbol")
    monkeypatch.setattr(flash.importlib.util, "find_spec", broken)
    assert not flash._has("flash_attn.flash_attn_interface")


def test_fake_kernels_give_the_real_shapes():
    """torch.compile plans the block around these: out [b, s, nq, d], lse [b, nq, s] fp32, grads like inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 16, 8, 64, dtype=torch.bfloat16)
        k = v = torch.empty(2, 16, 2, 64, dtype=torch.bfloat16)
        out, lse = torch.ops.neox.fa4_fwd(q, k, v, 0.125)
        dq, dk, dv = torch.ops.neox.fa4_bwd(out, q, k, v, out, lse, 0.125)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((2, 16, 8, 64), torch.bfloat16, (2, 8, 16), torch.float32)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
