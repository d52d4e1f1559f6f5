"""MasterWeightAdamW (``optimizer_master_weights``) against PyTorch's AdamW on fp32 parameters.

The reference gets the same bf16-valued gradients as fp32 tensors, which is what autocast over fp32
weights produces at one micro-batch per step; its fp32 weights must equal our masters, and our bf16
parameters must be those weights rounded to bf16.
"""

import pytest
import torch

from neox.config.args import NeoXArgs
from neox.errors import ConfigError
from neox.training.grad_clip import clip_grad_norm_, release_grad_scale
from neox.training.master_weights import MasterWeightAdamW, to_half_parameters

SHAPES = [(16, 8), (8,), (4, 4, 2)]


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16().float()) for s in SHAPES]
    ours = [torch.nn.Parameter(p.detach().bfloat16()) for p in ref]
    return ref, ours


def _groups(params, wd=0.1):
    return [{"params": [params[0], params[2]], "weight_decay": wd}, {"params": [params[1]], "weight_decay": 0.0}]


def _grads(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=g) * 3).bfloat16() for s in SHAPES]


def _check(ref, ours, opt):
    for r, p in zip(ref, ours):
        torch.testing.assert_close(opt.state[p]["master"], r.detach(), rtol=1e-6, atol=1e-7)
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), r.detach().bfloat16())


def test_matches_torch_adamw_with_schedule_and_decay_groups():
    ref, ours = _pair()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt_ref = torch.optim.AdamW(_groups(ref), foreach=False, **kw)
    opt = MasterWeightAdamW(_groups(ours), **kw)
    for step in range(5):
        for r, p, g in zip(ref, ours, _grads(step)):
            r.grad, p.grad = g.float(), g.clone()
        for group in opt_ref.param_groups + opt.param_groups:
            group["lr"] = 1e-2 * (step + 1) / 5  # the LR schedule sets a new value every step
        opt_ref.step()
        opt.step()
        _check(ref, ours, opt)
    assert all(opt.state[p]["master"].dtype == torch.float32 for p in ours)
    assert all(float(opt.state[p]["step"]) == 5 for p in ours)


def test_clip_through_grad_scale_equals_clipping_the_reference():
    ref, ours = _pair(1)
    opt_ref = torch.optim.AdamW(_groups(ref), lr=1e-2, foreach=False)
    opt = MasterWeightAdamW(_groups(ours), lr=1e-2)
    for step in range(3):
        for r, p, g in zip(ref, ours, _grads(step)):
            r.grad, p.grad = g.float(), g.clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt_ref.step()
        norm = clip_grad_norm_(ours, 1.0, opt)
        assert hasattr(opt, "grad_scale")  # folded into the update, gradients left as they are
        opt.step()
        release_grad_scale(opt)
        torch.testing.assert_close(norm, ref_norm)
        _check(ref, ours, opt)


def test_state_dict_keeps_fp32_masters_and_resumes_exactly(tmp_path):
    ref, ours = _pair(2)
    opt = MasterWeightAdamW(_groups(ours), lr=1e-2)
    for step in range(2):
        for p, g in zip(ours, _grads(step)):
            p.grad = g.clone()
        opt.step()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in ours]}, tmp_path / "s.pt")
    for p, g in zip(ours, _grads(2)):
        p.grad = g.clone()
    opt.step()
    expected = [opt.state[p]["master"].clone() for p in ours]

    saved = torch.load(tmp_path / "s.pt")
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = MasterWeightAdamW(_groups(resumed), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    assert all(opt2.state[p]["master"].dtype == torch.float32 for p in resumed)
    for p, g in zip(resumed, _grads(2)):
        p.grad = g.clone()
    opt2.step()
    for p, e in zip(resumed, expected):
        assert torch.equal(opt2.state[p]["master"], e)


def test_weights_loaded_before_the_first_step_are_trained():
    """Masters come from the parameters at the first step, not from their values at construction."""
    _, ours = _pair(3)
    opt = MasterWeightAdamW(_groups(ours), lr=0.0, weight_decay=0.0)
    loaded = [torch.full(s, 0.5) for s in SHAPES]
    with torch.no_grad():
        for p, w in zip(ours, loaded):
            p.copy_(w)  # e.g. a weights-only checkpoint load after the engine is built
    for p, g in zip(ours, _grads(0)):
        p.grad = g.clone()
    opt.step()
    for p, w in zip(ours, loaded):
        assert torch.equal(p.detach().float(), w)


def test_loads_a_torch_adamw_state_without_masters():
    """A state saved by torch AdamW over fp32 parameters: moments kept, master taken from the parameter."""
    first, ours = _pair(4)
    opt_first = torch.optim.AdamW(_groups(first), lr=1e-2, foreach=False)
    for r, g in zip(first, _grads(0)):
        r.grad = g.float()
    opt_first.step()
    saved = opt_first.state_dict()
    # reference: torch AdamW continuing from the bf16 weights (what the model holds) and the saved moments
    ref = [torch.nn.Parameter(r.detach().bfloat16().float()) for r in first]
    opt_ref = torch.optim.AdamW(_groups(ref), lr=1e-2, foreach=False)
    opt_ref.load_state_dict(saved)
    with torch.no_grad():
        for p, r in zip(ours, first):
            p.copy_(r)
    opt = MasterWeightAdamW(_groups(ours), lr=1e-2)
    opt.load_state_dict(saved)
    for r, p, g in zip(ref, ours, _grads(1)):
        r.grad, p.grad = g.float(), g.clone()
    opt_ref.step()
    opt.step()
    _check(ref, ours, opt)


def test_to_half_parameters_converts_in_place():
    model = torch.nn.Linear(4, 3)
    ids = [id(p) for p in model.parameters()]
    to_half_parameters(model, torch.bfloat16)
    assert [id(p) for p in model.parameters()] == ids
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


BASE = dict(precision="fp32", torch_autocast={"enabled": True, "dtype": "bfloat16"}, optimizer_master_weights=True,
            zero_optimization={"stage": 0}, num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
            max_position_embeddings=32, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
            optimizer={"type": "AdamW", "params": {"lr": 1e-3}}, padded_vocab_size=128)


def _resolve(**overrides):
    values = {**BASE, **overrides}
    return NeoXArgs.from_flat(values, sources={k: "conf.yml" for k in values}, world_size=1)


def test_config_accepts_the_intended_setup():
    assert _resolve().precision.optimizer_master_weights


@pytest.mark.parametrize("change, key", [
    ({"torch_autocast": {"enabled": False}}, "torch_autocast"),
    ({"torch_autocast": {"enabled": True, "dtype": "float16"}}, "torch_autocast"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization"),  # stage 1 at data parallel 1 is accepted
    ({"pipe_parallel_size": 1}, "pipe_parallel_size"),
    ({"optimizer": {"type": "SGD", "params": {"lr": 1e-3}}}, "optimizer"),
    ({"fp32_residual_connection": True}, "fp32_residual_connection"),
])
def test_config_refuses_other_setups_with_one_line(change, key):
    with pytest.raises(ConfigError) as err:
        _resolve(**change)
    message = str(err.value)
    assert message.startswith("conf.yml: optimizer_master_weights:") and key in message and "\n" not in message


def test_bf16_accumulation_can_be_accepted_explicitly():
    _resolve(gradient_accumulation_steps=4, data_types={"grad_accum_dtype": "bf16"})


def test_fp32_optimizer_adopts_saved_masters():
    """Resuming with the key off: the fp32 parameters take the saved masters, not the bf16 weights."""
    from neox.training.master_weights import adopt_masters

    _, ours = _pair(5)
    opt = MasterWeightAdamW(_groups(ours), lr=1e-2)
    for p, g in zip(ours, _grads(0)):
        p.grad = g.clone()
    opt.step()
    masters = [opt.state[p]["master"].clone() for p in ours]
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in ours]  # what the bf16 module weights load as
    plain = torch.optim.AdamW(_groups(fp32), lr=1e-2)
    plain.load_state_dict(opt.state_dict())
    assert adopt_masters(plain) == len(fp32)
    for p, m in zip(fp32, masters):
        assert torch.equal(p.detach(), m)
        assert "master" not in plain.state[p] and "exp_avg" in plain.state[p]
    assert adopt_masters(opt) == 0  # the master-weight optimizer keeps its own
