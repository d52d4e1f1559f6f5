"""FlashAttention-4 through neox's custom ops (neox/model/flash.py) against an fp64 reference and SDPA:
forward and backward, grouped and plain heads, eager and inside a fully compiled function."""

import pytest
import torch
import torch.nn.functional as F

from neox.model.flash import FA4, flash_attention, flash_kernel

pytestmark = pytest.mark.skipif(flash_kernel() != FA4, reason="needs flash-attn-4 on a Hopper/Blackwell GPU")


def _inputs(b, s, nq, nkv, d):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda") for h in (nq, nkv, nkv))
    return q, k, v, torch.randn(b, s, nq, d, device="cuda")


def _reference(q, k, v, grad):
    """fp64 math attention on [b, s, h, d] tensors: output and the three gradients."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                                         v.repeat_interleave(rep, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    out.backward(grad.double())
    return [t.float() for t in (out, q.grad, k.grad, v.grad)]


def _run(fn, q, k, v, grad):
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.bfloat16())
    return [t.float() for t in (out, q.grad, k.grad, v.grad)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=k.shape[2] != q.shape[2]).transpose(1, 2)


def _fa4(q, k, v):
    return flash_attention(FA4, q, k, v, 0.0, None)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [(2, 1024, 8, 2, 64), (1, 2048, 8, 8, 128), (2, 512, 32, 4, 64)])
def test_fa4_matches_fp64_as_closely_as_sdpa(shape):
    q, k, v, grad = _inputs(*shape)
    ref = _reference(q, k, v, grad)
    fa4, sdpa = _run(_fa4, q, k, v, grad), _run(_sdpa, q, k, v, grad)
    for name, a, s, r in zip(("out", "dq", "dk", "dv"), fa4, sdpa, ref):
        assert _rel(a, r) < max(2 * _rel(s, r), 1e-2), (name, _rel(a, r), _rel(s, r))


def test_fa4_compiles_in_one_graph_and_matches_eager():
    q, k, v, grad = _inputs(2, 1024, 8, 2, 64)

    def block(q, k, v):  # the attention between the ops a compiled transformer block puts around it
        return _fa4(q * 1.5, k, v).sin()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    eager, comp = _run(block, q, k, v, grad), _run(compiled, q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), comp, eager):
        assert _rel(a, b) < 1e-2, (name, _rel(a, b))


@pytest.mark.parametrize("shape", [(2, 1024, 8, 2, 64), (1, 2048, 8, 8, 128)])
def test_fa4_direct_kernel_calls_match_its_interface(shape):
    """After a shape's first call neox calls FA4's compiled kernels itself (neox/model/kernel_replay.py);
    on fresh inputs every later call gives what FA4's own interface gives."""
    from neox.model.flash import _fa4_interface_bwd, _fa4_interface_fwd, _fa4_replays
    from neox.model.kernel_replay import _Plan

    b, s, nq, nkv, d = shape
    scale = d ** -0.5
    for seed in range(3):
        torch.manual_seed(seed)
        q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for h in (nq, nkv, nkv, nq))
        out, lse = torch.ops.neox.fa4_fwd(q, k, v, scale)
        want_out, want_lse = _fa4_interface_fwd(q, k, v, scale)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        got = torch.ops.neox.fa4_bwd(dout, q, k, v, out, lse, scale)
        want = _fa4_interface_bwd(dout, q, k, v, out, lse, scale)
        for name, a, w in zip(("dq", "dk", "dv"), got, want):
            assert a.dtype == w.dtype and a.shape == w.shape
            assert _rel(a.float(), w.float()) < 1e-3, (name, _rel(a.float(), w.float()))  # dq sums with atomics
    assert _fa4_replays() is not None, "NEOX_FA4_INTERFACE=1 turns the direct calls off"
    for replay in _fa4_replays():
        assert replay._plans and all(isinstance(p, _Plan) for p in replay._plans.values()), replay.name
