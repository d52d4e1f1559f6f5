"""Fast by default (issue 20): what an unchanged GPT-NeoX-style bf16 config resolves to, and the pieces
of the master-weight path that make it the default (fp32 gradient accumulation, non-finite skipping).

References: the dry run's DeepSpeed config and stderr as a user sees them; torch's AdamW on fp32 copies
trained on the full batch; torch's own eager modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neox.config import NeoXArgs, fast_path
from neox.training.master_weights import MasterWeightAdamW

ROOT = Path(__file__).resolve().parents[2]
# a GPT-NeoX-style bf16 config as users write it (Llemma's precision block): no torch_compile key,
# no optimizer_master_weights key
NEOX_BF16 = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "max_position_embeddings": 32,
    "norm": "rmsnorm", "pos_emb": "rotary", "activation": "swiglu", "tokenizer_type": "CharLevelTokenizer",
    "precision": "bfloat16", "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
    "data_types": {"grad_accum_dtype": "fp32"}, "gradient_accumulation_steps": 2,
    "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-4}},
}


def _dry_run(tmp_path: Path, flat: dict) -> subprocess.CompletedProcess:
    conf = tmp_path / "neox_bf16.yml"
    conf.write_text(json.dumps(flat))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(ROOT / "deepy.py"), "--dry-run", "train.py", str(conf)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_neox_style_bf16_config_takes_the_master_weight_path(tmp_path):
    out = _dry_run(tmp_path, {**NEOX_BF16, "num_gpus": 1})
    assert out.returncode == 0, out.stderr
    ds = json.loads(out.stdout)["deepspeed_config"]
    # neox's optimizer inside a plain ZeRO-0 engine: bf16 and accumulation are neox's
    assert ds["zero_optimization"] == {"stage": 0} and ds["bf16"] == {"enabled": False}
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "data_types" not in ds
    assert ("neox: ranks will run bf16 parameters with fp32 master weights (fast path, gradients accumulated "
            "in fp32;") in out.stderr
    assert "neox: ranks will run torch.compile: on for CUDA ranks, off for CPU ranks" in out.stderr


def test_zero1_at_data_parallel_2_keeps_deepspeed(tmp_path):
    """ZeRO-1 over two ranks partitions the fp32 state, which replicated masters would double."""
    out = _dry_run(tmp_path, {**NEOX_BF16, "num_gpus": 2})
    assert out.returncode == 0, out.stderr
    ds = json.loads(out.stdout)["deepspeed_config"]
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"] == {"enabled": True}
    assert "neox: ranks will run DeepSpeed's bf16 optimizer (ZeRO stage 1 at data parallel 2" in out.stderr


@pytest.mark.parametrize("change, enabled", [
    ({}, True),
    ({"zero_optimization": {"stage": 0}}, True),
    ({"optimizer_master_weights": False}, False),
    ({"zero_optimization": {"stage": 2}}, False),
    ({"precision": "fp32", "bf16": {"enabled": False}}, False),
    ({"optimizer": {"type": "SGD", "params": {"lr": 1e-3}}}, False),
])
def test_master_weight_choice(change, enabled):
    args = NeoXArgs.from_flat({**NEOX_BF16, **change}, world_size=1)
    assert fast_path.master_weights_choice(args).enabled is enabled
    assert fast_path.plan(args)["fp32_gradient_accumulation"] is enabled


def test_zero0_replicates_masters_at_data_parallel_2():
    args = NeoXArgs.from_flat({**NEOX_BF16, "zero_optimization": {"stage": 0}}, world_size=2)
    assert args.parallel.data_parallel_size == 2 and fast_path.master_weights_choice(args).enabled


def test_torch_compile_unset_is_eager_on_cpu_ranks():
    from neox.training.fast_path import resolve_on_rank

    args = NeoXArgs.from_flat({**NEOX_BF16, "padded_vocab_size": 128}, world_size=1)
    assert args.model.torch_compile is None
    on_cpu, notes = resolve_on_rank(args, torch.device("cpu"), None)
    assert on_cpu.model.torch_compile is False and notes[0].startswith("torch.compile off")
    assert on_cpu.precision.optimizer_master_weights is True  # what ran is what checkpoints record
    assert fast_path.compile_for(None, cuda=True)[0] and not fast_path.compile_for(False, cuda=True)[0]


def test_compile_on_cuda_ranks_uses_a_cache_under_save(tmp_path, monkeypatch):
    from neox.training import fast_path as rank_fast_path

    monkeypatch.setenv(rank_fast_path.INDUCTOR_CACHE_ENV, "x")
    monkeypatch.delenv(rank_fast_path.INDUCTOR_CACHE_ENV)
    args = NeoXArgs.from_flat({**NEOX_BF16, "padded_vocab_size": 128, "save": str(tmp_path / "ckpt")}, world_size=1)
    resolved, notes = rank_fast_path.resolve_on_rank(args, torch.device("cuda"), None)
    cache = str(tmp_path / "ckpt" / ".cache" / "torchinductor")
    assert resolved.model.torch_compile is True and os.environ[rank_fast_path.INDUCTOR_CACHE_ENV] == cache
    assert cache in notes[0]


def test_compile_summary_says_cold_or_warm():
    from torch._dynamo.utils import counters

    from neox.training.fast_path import compile_summary

    counters["inductor"].clear()
    counters["inductor"]["fxgraph_cache_miss"] += 3
    assert "first step 12.0 s with torch.compile (cold: 0 compiled graphs from Inductor's cache, 3 compiled anew" \
        in compile_summary(12.0)
    counters["inductor"].clear()
    counters["inductor"]["fxgraph_cache_hit"] += 3
    assert "(warm: 3 compiled graphs from Inductor's cache, 0 compiled anew" in compile_summary(2.0)
    counters["inductor"].clear()


def _linear_pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 16, generator=g).bfloat16()
    ours = torch.nn.Parameter(w.clone())
    ref = torch.nn.Parameter(w.float())
    return ours, ref


def test_fp32_accumulation_equals_one_micro_batch_of_twice_the_size():
    """2 micro-batches (loss / 2 each, as DeepSpeed's engine scales it) summed in fp32, against torch
    AdamW on an fp32 copy whose gradient is the full batch's, computed in fp32."""
    ours, ref = _linear_pair()
    opt = MasterWeightAdamW([ours], lr=1e-2, weight_decay=0.1, accumulate_fp32=True)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)
        for half in (slice(0, 4), slice(4, 8)):
            loss = torch.nn.functional.mse_loss(x[half].bfloat16() @ ours.t(), y[half].bfloat16()) / 2
            loss.backward()
            opt.accumulate(boundary=half.start == 4)
            assert ours.grad is None  # freed into the fp32 sums
        opt.step()
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(x @ ref.t(), y).backward()
        ref_opt.step()
    # bf16 forward / gradients against fp32 ones: bf16 tolerance on the fp32 masters
    torch.testing.assert_close(opt.state[ours]["master"], ref.detach(), rtol=2e-2, atol=2e-3)
    assert torch.equal(ours.detach(), opt.state[ours]["master"].bfloat16())


def test_fp32_sums_are_the_exact_fp32_sum_of_the_micro_batch_gradients():
    ours, _ = _linear_pair()
    opt = MasterWeightAdamW([ours], lr=1e-2, accumulate_fp32=True)
    grads = [torch.randn(8, 16).bfloat16() for _ in range(4)]
    for i, grad in enumerate(grads):
        ours.grad = grad.clone()
        opt.accumulate(boundary=i == 3)
    (pair,) = opt.gradients([ours])
    assert torch.equal(pair[1], sum(g.float() for g in grads))


def test_nonfinite_step_is_skipped():
    ours, _ = _linear_pair()
    opt = MasterWeightAdamW([ours], lr=1e-2, skip_nonfinite=True)
    ours.grad = torch.ones_like(ours)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[ours].items()}
    weights = ours.detach().clone()
    ours.grad = torch.full_like(ours, float("inf"))
    opt.step()
    assert opt.overflow
    assert torch.equal(ours.detach(), weights)
    assert all(torch.equal(opt.state[ours][k], v) for k, v in before.items())
    ours.grad = torch.ones_like(ours)
    opt.step()
    assert not opt.overflow and not torch.equal(ours.detach(), weights)


@pytest.mark.parametrize("saved, keeps_deepspeed", [
    ({"precision": "bfloat16", "optimizer_master_weights": False}, True),  # DeepSpeed's bf16 optimizer state
    (None, True),  # no neox_args.json: written by GPT-NeoX / DeepSpeed directly
    ({"precision": "bfloat16", "optimizer_master_weights": True}, False),
])
def test_resume_of_a_deepspeed_bf16_checkpoint_keeps_its_optimizer(tmp_path, saved, keeps_deepspeed):
    from neox.training.fast_path import resolve_on_rank

    tag = tmp_path / "ckpt" / "global_step5"
    tag.mkdir(parents=True)
    if saved is not None:
        (tag / "neox_args.json").write_text(json.dumps(saved))
    args = NeoXArgs.from_flat({**NEOX_BF16, "padded_vocab_size": 128}, world_size=1)
    resolved, notes = resolve_on_rank(args, torch.device("cpu"), str(tag))
    assert resolved.precision.optimizer_master_weights is (not keeps_deepspeed)
    assert ("saved by DeepSpeed's bf16 optimizer" in notes[1]) is keeps_deepspeed
    # without optimizer state to resume, a new path is fine
    fresh = NeoXArgs.from_flat({**NEOX_BF16, "padded_vocab_size": 128, "no_load_optim": True}, world_size=1)
    assert resolve_on_rank(fresh, torch.device("cpu"), str(tag))[0].precision.optimizer_master_weights is True


def test_backward_hooks_sum_each_gradient_in_fp32_as_backward_produces_it():
    """The sums the hooks build equal the fp32 sum of the bf16 gradients that plain autograd gives
    (a twin model without the optimizer), and no bf16 gradient is left behind."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4)).bfloat16()
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4)).bfloat16()
    twin.load_state_dict(ours.state_dict())
    opt = MasterWeightAdamW(ours.parameters(), accumulate_fp32=True)
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in twin.parameters()]
    for _ in range(3):
        x = torch.randn(8, 16).bfloat16()
        ours(x).square().mean().backward()
        assert all(p.grad is None for p in ours.parameters())
        twin(x).square().mean().backward()
        for total, p in zip(expected, twin.parameters()):
            total += p.grad.float()
            p.grad = None
    for (_, got), want in zip(opt.gradients(list(ours.parameters())), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("change, world, switch, on", [
    ({"data_types": {"grad_accum_dtype": "bf16"}}, 1, "1", True),
    ({"data_types": {"grad_accum_dtype": "bf16"}}, 1, None, False),  # the switch is off by default
    ({}, 1, "1", False),  # fp32 sums
    ({"data_types": {"grad_accum_dtype": "bf16"}, "gradient_accumulation_steps": 1}, 1, "1", False),
    ({"data_types": {"grad_accum_dtype": "bf16"}, "zero_optimization": {"stage": 0}}, 2, "1", False),
])
def test_gemm_accumulation_only_with_its_switch_bf16_sums_and_one_process(monkeypatch, change, world, switch, on):
    from neox.model.gpt import GPTModel
    from neox.training.optim import build_optimizer

    if switch is None:
        monkeypatch.delenv(fast_path.GEMM_ACCUMULATION_SWITCH, raising=False)
    else:
        monkeypatch.setenv(fast_path.GEMM_ACCUMULATION_SWITCH, switch)
    args = NeoXArgs.from_flat({**NEOX_BF16, "padded_vocab_size": 128, **change}, world_size=world)
    assert fast_path.accumulates_in_gemm(args) is on
    assert ("inside the weight-gradient GEMMs" in fast_path.master_message(fast_path.master_weights_choice(args), args)) is on
    if world == 1:
        opt = build_optimizer(GPTModel(args.model), args, torch.device("cpu"))
        assert isinstance(opt, MasterWeightAdamW) and opt.gemm_accumulation is on
