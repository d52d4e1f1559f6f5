"""neox's foreach clipping equals torch's reference clip_grad_norm_ (one process, TP 1)."""

import torch

from neox.training.grad_clip import clip_grad_norm_, uses_own_clipping


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
