"""neox's foreach clipping equals torch's reference clip_grad_norm_ (one process, TP 1)."""

import torch

from neox.training.grad_clip import clip_grad_norm_, release_grad_scale, uses_own_clipping


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(7, 5), (5,), (3, 3, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return params


def test_matches_torch_clip_grad_norm():
    for max_norm in (0.5, 1e6):
        ours, ref = _params(0), _params(0)
        norm = clip_grad_norm_(ours, max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        torch.testing.assert_close(norm, ref_norm)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad, b.grad)


def test_zero_max_norm_only_measures():
    params = _params(1)
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 0.0)
    expected = torch.linalg.vector_norm(torch.cat([b.reshape(-1) for b in before]))
    torch.testing.assert_close(norm, expected)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


def test_which_engines_clip_here():
    assert uses_own_clipping(0, False, False)
    assert not uses_own_clipping(1, False, False)
    assert not uses_own_clipping(0, False, True)
    assert not uses_own_clipping(0, True, False)


def test_clip_folded_into_fused_adamw_equals_separate_clip():
    """Clipping through fused AdamW's grad_scale updates the weights as scaling the gradients first does."""
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (4, 4)]
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    opt_ours = torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(3):
        grads = [torch.randn(s) * 10 for s in shapes]
        for p, q, g in zip(ref, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt_ref.step()
        norm = clip_grad_norm_(ours, 1.0, opt_ours)
        assert hasattr(opt_ours, "grad_scale")
        opt_ours.step()
        release_grad_scale(opt_ours)
        assert not hasattr(opt_ours, "grad_scale")
        torch.testing.assert_close(norm, ref_norm)
        for p, q in zip(ref, ours):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)  # clipped gradient written back


def test_unfused_optimizer_keeps_the_separate_scaling():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    opt = torch.optim.SGD([p], lr=0.1)
    clip_grad_norm_([p], 1.0, opt)
    assert not hasattr(opt, "grad_scale")
    torch.testing.assert_close(p.grad.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-6)
