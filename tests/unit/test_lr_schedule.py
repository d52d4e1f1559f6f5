"""LR schedules against NeoX's AnnealingLR formulas written out in the test."""

import math

import pytest
import torch

from neox.config import LRConfig
from neox.errors import ConfigError
from neox.training.lr_schedule import AnnealingLR, lr_at, resolve_schedule


def _sched(style, **kw):
    cfg = LRConfig(lr_decay_style=style, **kw)
    return resolve_schedule(cfg, train_iters=100, base_lr=1e-3)


def test_warmup_fraction_then_cosine_to_min_lr():
    s = _sched("cosine", warmup=0.1, min_lr=1e-4)
    assert s["warmup_iters"] == pytest.approx(10.0) and s["decay_iters"] == 100
    assert lr_at(0, **s) == 0.0
    assert lr_at(5, **s) == pytest.approx(1e-3 * 5 / 10)
    assert lr_at(10, **s) == pytest.approx(1e-3)
    n, d = 55 - 10, 100 - 10
    assert lr_at(55, **s) == pytest.approx(1e-4 + (1e-3 - 1e-4) / 2 * (1 + math.cos(math.pi * n / d)))
    assert lr_at(100, **s) == pytest.approx(1e-4)
    assert lr_at(150, **s) == pytest.approx(1e-4)  # clamped past the decay, never rising again


def test_linear_with_warmup_iters_and_decay_iters():
    s = _sched("linear", warmup_iters=4, lr_decay_iters=50)
    assert lr_at(2, **s) == pytest.approx(0.5e-3)
    assert lr_at(20, **s) == pytest.approx(1e-3 * (46 - 16) / 46)
    assert lr_at(50, **s) == 0.0 and lr_at(80, **s) == 0.0


def test_constant_and_decay_lr_to():
    assert lr_at(70, **_sched("constant", warmup=0.0)) == pytest.approx(1e-3)
    s = _sched("cosine", warmup=0.0, decay_lr_to=0.1, min_lr=0.5)  # decay_lr_to wins over min_lr
    assert s["min_lr"] == pytest.approx(1e-4)
    assert lr_at(100, **s) == pytest.approx(1e-4)


def test_lr_decay_fraction():
    s = resolve_schedule(LRConfig(lr_decay_fraction=0.5, warmup=0.0), train_iters=100, base_lr=1.0)
    assert s["decay_iters"] == 50


def test_scheduler_writes_every_param_group():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [], "weight_decay": 0.0}], lr=123.0)
    sched = AnnealingLR(opt, _sched("linear", warmup_iters=2))
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    sched.step()
    assert all(g["lr"] == pytest.approx(0.5e-3) for g in opt.param_groups)
    state = sched.state_dict()
    other = AnnealingLR(opt, _sched("linear", warmup_iters=2))
    other.load_state_dict(state)
    assert other.num_iters == 1 and opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)


def test_bad_warmup_is_a_config_error():
    with pytest.raises(ConfigError, match="warmup_iters"):
        _sched("linear", warmup_iters=500)


def _saved(style="linear", **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = AnnealingLR(opt, _sched(style, **kw))
    sched.step(7)
    return sched.state_dict()


def _fresh(style="linear", **kw):
    kw.setdefault("warmup_iters", 2)
    flags = {k: kw.pop(k) for k in ("override", "use_checkpoint") if k in kw}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return AnnealingLR(opt, _sched(style, **kw), **flags), opt


def test_checkpoint_schedule_switches_as_gpt_neox():
    from neox.errors import CheckpointError

    saved = _saved(warmup_iters=2)  # linear over 100 iterations, position 7
    # neither switch: the config's schedule must be the checkpoint's (GPT-NeoX asserts it)
    same, opt = _fresh(warmup_iters=2)
    same.load_state_dict(saved)
    assert same.num_iters == 7 and opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (98 - 5) / 98)
    changed, _ = _fresh(warmup_iters=2, lr_decay_iters=50)
    with pytest.raises(CheckpointError, match="decay_iters 100 \\(config 50\\).*override_lr_scheduler"):
        changed.load_state_dict(saved)
    # override_lr_scheduler: the config's numbers, the checkpoint's position
    over, opt = _fresh(warmup_iters=2, lr_decay_iters=50, override=True)
    over.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (48 - 5) / 48)
    # use_checkpoint_lr_scheduler: the checkpoint's numbers
    use, opt = _fresh("cosine", warmup_iters=4, lr_decay_iters=50, use_checkpoint=True)
    use.load_state_dict(saved)
    assert use.schedule["style"] == "linear" and opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (98 - 5) / 98)
    with pytest.raises(ConfigError, match="override_lr_scheduler"):
        _fresh(override=True, use_checkpoint=True)
