"""Per-parameter norms on one rank: parameters and gradients against torch.linalg, including the
gradients neox's MasterWeightAdamW holds itself (fp32 sums over accumulated micro-batches)."""

from __future__ import annotations

import pytest
import torch

from neox.training.master_weights import MasterWeightAdamW
from neox.training.norms import GradNorms, norm_fields, param_norms


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _loss(model: torch.nn.Module, seed: int) -> torch.Tensor:
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
    return model(x).pow(2).mean()


def test_param_and_grad_norms_with_a_loss_scale():
    model = _model()
    (_loss(model, 1) * 64.0).backward()  # an fp16-style scaled loss
    grads = GradNorms(lambda: 64.0)
    grads.capture(model)
    engine = type("E", (), {"module": model})()
    fields = norm_fields(engine, True, grads)
    for name, p in model.named_parameters():
        assert fields["param_norms"][name] == pytest.approx(torch.linalg.vector_norm(p.detach()).item(), rel=1e-6)
        assert fields["grad_norms"][name] == pytest.approx(torch.linalg.vector_norm(p.grad / 64.0).item(), rel=1e-6)
    flat = torch.cat([p.grad.flatten() / 64.0 for p in model.parameters()])
    assert fields["grad_norm_total"] == pytest.approx(torch.linalg.vector_norm(flat).item(), rel=1e-6)
    assert fields["param_norm"] == pytest.approx(
        torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in model.parameters()])).item(), rel=1e-6)
    assert norm_fields(engine, False, None) == {}


def test_grad_norms_read_master_weight_sums():
    ref = _model()
    for seed in (1, 2):  # two micro-batches, plain autograd sums
        _loss(ref, seed).backward()
    model = _model()
    opt = MasterWeightAdamW(model.parameters(), accumulate_fp32=True)
    for seed in (1, 2):
        _loss(model, seed).backward()
        opt.accumulate(seed == 2)
    assert all(p.grad is None for p in model.parameters())  # the optimizer holds them
    grads = GradNorms(lambda: 1.0)
    grads.capture(model, opt)
    got = grads.read()
    for name, p in ref.named_parameters():
        assert got[name] == pytest.approx(torch.linalg.vector_norm(p.grad).item(), rel=1e-5)
    assert param_norms(model).keys() == got.keys()
