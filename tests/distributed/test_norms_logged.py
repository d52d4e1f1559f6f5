"""log_param_norm / log_grad_norm at tensor parallel 2: every per-parameter norm is that of the full
tensor (reference: the same model on one rank), and a ZeRO-1 run logs them with a total equal to
DeepSpeed's own global gradient norm."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import run_distributed
from tests.distributed.test_train_parity import make_corpus, release_groups, run_pretrain, tiny_flat
from tests.unit.test_model import V, llama_cfg


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, V, (2, 12), generator=g), torch.randint(0, V, (2, 12), generator=g)


def _norms(model: torch.nn.Module) -> tuple[dict, dict]:
    from neox.model import lm_loss
    from neox.training.norms import GradNorms, param_norms

    ids, labels = _batch()
    lm_loss(model(ids), labels, torch.ones_like(labels)).backward()
    grads = GradNorms(lambda: 1.0)
    grads.capture(model)
    return param_norms(model), grads.read()


def _ranks(rank: int, world: int, prefix: str, tmp: str) -> dict:
    from megatron_core import parallel_state
    from neox.model import GPTModel

    parallel_state.initialize_model_parallel(2, 1)
    params, grads = _norms(GPTModel(llama_cfg(), seed=11))
    release_groups()
    flat = tiny_flat(prefix, model_parallel_size=2, zero_optimization={"stage": 1}, train_iters=2,
                     log_param_norm=True, log_grad_norm=True, log_dir=f"{tmp}/logs")
    run_pretrain(flat, world)
    return {"params": params, "grads": grads}


def test_norms_at_tp2_are_full_tensor_norms(tmp_path: Path):
    from neox.model import GPTModel

    prefix = make_corpus(tmp_path)
    res = run_distributed(_ranks, 2, prefix, str(tmp_path))
    ref = GPTModel(llama_cfg(), seed=11)
    ref_params, ref_grads = _norms(ref)
    for n, p in ref.named_parameters():  # the reference itself, from the tensors
        assert ref_params[n] == pytest.approx(torch.linalg.vector_norm(p.detach()).item(), rel=1e-6)
        assert ref_grads[n] == pytest.approx(torch.linalg.vector_norm(p.grad).item(), rel=1e-6)
    for r in res:
        assert r["params"] == pytest.approx(ref_params, rel=1e-5)
        assert r["grads"] == pytest.approx(ref_grads, rel=1e-4)
    records = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    assert len(train) == 2
    for rec in train:
        assert set(rec["param_norms"]) == set(rec["grad_norms"]) and "layers.0.mlp.linear1.weight" in rec["param_norms"]
        assert rec["param_norm"] == pytest.approx(math.sqrt(sum(v * v for v in rec["param_norms"].values())))
        # DeepSpeed's global norm (pre-clipping) against the per-parameter ones
        assert rec["grad_norm_total"] == pytest.approx(rec["grad_norm"], rel=1e-4)
