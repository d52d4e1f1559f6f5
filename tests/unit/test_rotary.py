"""fp32 rotary embeddings against an fp64 reference at long-context positions."""

import math

import torch

from neox.model.rotary import apply_rotary, rotary_cos_sin


def _reference(x: torch.Tensor, pos: torch.Tensor, rot: int, base: float) -> torch.Tensor:
    """Rotary in fp64, written from the RoFormer formula with rotate-half pairing (i, i + rot/2)."""
    x = x.double()
    half = rot // 2
    inv = torch.tensor([1.0 / base ** (2 * i / rot) for i in range(half)], dtype=torch.float64)
    ang = pos.double()[:, None] * inv[None, :]  # [s, half]
    c, s = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:rot]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x[..., rot:]), dim=-1)


def _plain_bf16(x: torch.Tensor, pos: torch.Tensor, rot: int, base: float) -> torch.Tensor:
    """What a model cast to bf16 computes when its rotary tables live in bf16."""
    inv = (1.0 / base ** (torch.arange(0, rot, 2).float() / rot)).bfloat16()
    ang = pos.bfloat16()[:, None] * inv[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    c, s = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    xr = x[..., :rot]
    x1, x2 = xr.chunk(2, dim=-1)
    out = xr * c + torch.cat((-x2, x1), dim=-1) * s
    return torch.cat((out, x[..., rot:]), dim=-1)


def test_fp32_rotary_beats_plain_bf16_beyond_4096():
    torch.manual_seed(0)
    d, rot, base = 64, 64, 10000.0
    pos = torch.arange(4096, 4096 + 512, 7)
    x = torch.randn(1, pos.numel(), 2, d).bfloat16()
    ref = _reference(x, pos, rot, base)
    cos, sin = rotary_cos_sin(pos, rot, base)
    assert cos.dtype == torch.float32
    ours = apply_rotary(x, cos, sin)
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.double() - ref).abs().mean().item()
    err_plain = (_plain_bf16(x, pos, rot, base).double() - ref).abs().mean().item()
    # Ours is limited only by rounding the result to bf16 (~2^-9 relative).
    assert err_ours < 0.01
    assert err_ours * 10 < err_plain, (err_ours, err_plain)


def test_partial_rotary_leaves_the_rest_untouched_and_matches_fp64():
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64).float()
    pos = torch.tensor([0, 1, 2, 3, 70000])
    cos, sin = rotary_cos_sin(pos, 4, 5000.0)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:])
    ref = _reference(x, pos, 4, 5000.0)
    # fp32 angles at position 7e4 carry ~7e4 * 2^-24 rad of error; elsewhere fp32 rounding.
    assert (out.double() - ref).abs().max().item() < 70000 * 2**-23 * 4 + 1e-6
    assert math.isclose(cos[0, 0, 0].item(), 1.0)


def test_rotation_and_its_gradient_are_transformers_rotate_half_bit_for_bit():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    b, s, h, d, base = 2, 9, 3, 16, 10000.0
    pos = torch.arange(s).expand(b, s)
    x = torch.randn(b, s, h, d, requires_grad=True)
    cos, sin = rotary_cos_sin(pos, d, base)
    ours = apply_rotary(x, cos, sin)
    # transformers' tables: cat((angles, angles)).cos()/.sin(), heads on dim 1
    angles = pos.float()[..., None] * (1.0 / base ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((angles, angles), dim=-1)
    xt = x.detach().transpose(1, 2).clone().requires_grad_()
    theirs, _ = apply_rotary_pos_emb(xt, xt, emb.cos(), emb.sin())
    assert torch.equal(ours, theirs.transpose(1, 2))
    g = torch.randn_like(ours)
    ours.backward(g)
    theirs.backward(g.transpose(1, 2))
    assert torch.equal(x.grad, xt.grad.transpose(1, 2))
