"""Weight gradients accumulated inside their GEMM (megatron_core.tensor_parallel.grad_accumulation,
MasterWeightAdamW's ``gemm_accumulation``), against the exact (fp64) sum of each micro-batch's own
bf16 gradient and against autograd's accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from neox.training.master_weights import MasterWeightAdamW

BF16_EPS = 2.0**-8


class _Tiny(torch.nn.Module):
    """Embedding -> column-parallel -> SiLU -> row-parallel (with bias) -> norm: linear weights that
    accumulate in their GEMM beside parameters that do not (embedding, bias, norm)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 32)
        self.up = ColumnParallelLinear(32, 64, bias=False)
        self.down = RowParallelLinear(64, 32, bias=True)
        self.norm = torch.nn.RMSNorm(32)
        self.to(torch.bfloat16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(F.silu(self.up(self.emb(ids)))))


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (2, 16), generator=g) for _ in range(n)]


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).float().square().mean()


def _each_micro_batch_gradient(ids: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    model = _Tiny()
    out = []
    for b in ids:
        grads = torch.autograd.grad(_loss(model, b), list(model.parameters()))
        out.append({n: g for (n, _), g in zip(model.named_parameters(), grads)})
    return out


def _accumulated(ids: list[torch.Tensor], gemm: bool, swap_down: bool = False, compiled: bool = False):
    model = _Tiny()
    if swap_down:  # as FP8 training swaps a layer's matmul: this layer leaves the sum to the optimizer
        model.down.linear_fn = F.linear
    opt = MasterWeightAdamW(model.parameters(), lr=1e-3, gemm_accumulation=gemm)
    run = torch.compile(model) if compiled else model
    parked = []
    for i, b in enumerate(ids):
        _loss(run, b).backward()
        boundary = i == len(ids) - 1
        if gemm and i > 0:  # the linear weights' gradients went into the parked sum, none to autograd
            parked.append((model.up.weight.grad, model.up.weight.main_grad.data_ptr()))
        opt.accumulate(boundary)
    assert all(not hasattr(p, "main_grad") for p in model.parameters())
    return model, opt, parked


@pytest.mark.parametrize("swap_down", [False, True], ids=["gemm", "one_layer_swapped"])
def test_sums_are_the_micro_batch_gradients_sums(swap_down):
    ids = _batches(3)
    each = _each_micro_batch_gradient(ids)
    exact = {n: sum(g[n].double() for g in each) for n in each[0]}
    fused, _, parked = _accumulated(ids, gemm=True, swap_down=swap_down)
    plain, _, _ = _accumulated(ids, gemm=False)
    first_ptr = parked[0][1]
    assert all(g is None and ptr == first_ptr for g, ptr in parked)  # added in place, into one buffer
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        scale = exact[name].abs().max().item()
        err_fused = (p.grad.double() - exact[name]).abs().max().item() / scale
        err_plain = (q.grad.double() - exact[name]).abs().max().item() / scale
        # two additions, each rounded to bf16 once (half an ulp, relative to the largest entry)
        assert err_fused <= 2 * BF16_EPS, (name, err_fused)
        assert err_plain <= 2 * BF16_EPS, (name, err_plain)


def test_input_gradients_are_autograds():
    ids = _batches(2)

    def run(gemm: bool) -> list[torch.Tensor]:
        model = _Tiny()
        opt = MasterWeightAdamW(model.parameters(), lr=1e-2, gemm_accumulation=gemm)
        x_grads = []
        for i, b in enumerate(ids):
            x = model.emb(b).detach().requires_grad_()
            model.norm(model.down(F.silu(model.up(x)))).float().square().mean().backward()
            x_grads.append(x.grad)
            opt.accumulate(i == len(ids) - 1)
        return x_grads

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_compiled_block_accumulates_in_place():
    ids = _batches(2)
    eager, _, _ = _accumulated(ids, gemm=True)
    compiled, _, parked = _accumulated(ids, gemm=True, compiled=True)
    assert all(g is None for g, _ in parked)
    for (name, p), (_, q) in zip(compiled.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=2 * BF16_EPS, atol=1e-6, msg=name)


def test_refuses_fp32_sums_and_data_parallel():
    params = [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="one process"):
        MasterWeightAdamW(params, gemm_accumulation=True, accumulate_fp32=True)
