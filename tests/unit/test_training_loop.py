"""Loop pieces with a fake engine: NaN guard, fp16 skips, save schedule, stop requests, eod masking."""

import os
import signal

import pytest
import torch

from neox.checkpoint.state import TrainState
from neox.config import CheckpointConfig, LoggingConfig, NeoXArgs, TrainingConfig
from neox.metrics import MetricsLogger
from neox.training.loop import TrainContext, TrainingDivergedError, _account, should_save
from neox.training.optim import param_groups
from neox.training.preemption import StopRequests
from neox.training.step import StepResult, get_batch


class FakeEngine:
    def __init__(self, fp16=False):
        self._fp16 = fp16

    def fp16_enabled(self):
        return self._fp16

    def train_batch_size(self):
        return 4


def _ctx(fp16=False, max_nan=3):
    from neox.config import ModelConfig

    args = NeoXArgs(training=TrainingConfig(max_nan_iterations=max_nan), model=ModelConfig(seq_length=8))
    return TrainContext(args=args, engine=FakeEngine(fp16), device=torch.device("cpu"), loss_fn=None,
                        eod=0, logger=MetricsLogger(LoggingConfig(), enabled=False), stop=StopRequests())


def test_bf16_nan_run_stops_with_one_line_error():
    ctx, state, run = _ctx(), TrainState(), 0
    run = _account(ctx, state, StepResult(float("nan"), True), run)
    run = _account(ctx, state, StepResult(2.0, True), run)  # a finite loss resets the streak
    assert run == 0 and state.nan_iters == 1
    run = _account(ctx, state, StepResult(float("inf"), True), run)
    run = _account(ctx, state, StepResult(float("nan"), True), run)
    with pytest.raises(TrainingDivergedError, match="max_nan_iterations=3") as err:
        _account(ctx, state, StepResult(float("nan"), True), run)
    assert "\n" not in str(err.value)
    assert state.iteration == 5 and state.consumed_train_samples == 20 and state.consumed_tokens == 160


def test_fp16_overflow_is_skipped_not_fatal():
    ctx, state, run = _ctx(fp16=True, max_nan=1), TrainState(), 0
    for _ in range(3):
        run = _account(ctx, state, StepResult(float("inf"), False), run)
    assert state.skipped_iters == 3 and state.nan_iters == 3


def test_save_schedule():
    lin = NeoXArgs(checkpoint=CheckpointConfig(save="x", checkpoint_factor=5, extra_save_iters=[3]))
    assert [i for i in range(1, 16) if should_save(lin, i)] == [3, 5, 10, 15]
    log = NeoXArgs(checkpoint=CheckpointConfig(save="x", checkpoint_factor=2, checkpoint_scale="log"))
    assert [i for i in range(1, 20) if should_save(log, i)] == [2, 4, 8, 16]
    assert not should_save(NeoXArgs(checkpoint=CheckpointConfig(checkpoint_factor=1)), 1)


def test_stop_requests(tmp_path):
    path = tmp_path / "STOP"
    stop = StopRequests(str(path))
    assert stop.should_stop(torch.device("cpu")) is None
    path.touch()
    assert "kill switch" in stop.should_stop(torch.device("cpu"))
    stop = StopRequests(None)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.local_reason() == "signal SIGUSR1"
    finally:
        stop.uninstall()


def test_eod_mask_loss_masks_eod_inputs():
    text = torch.tensor([[5, 0, 7, 8, 0, 9]])
    tokens, labels, mask = get_batch({"text": text}, eod=0, eod_mask_loss=True, device=torch.device("cpu"))
    assert tokens.tolist() == [[5, 0, 7, 8, 0]] and labels.tolist() == [[0, 7, 8, 0, 9]]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 1.0, 0.0]]
    _, _, mask = get_batch({"text": text}, eod=0, eod_mask_loss=False, device=torch.device("cpu"))
    assert mask.sum() == 5


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(4, 4), "final_norm": torch.nn.LayerNorm(4)})
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_logged_loss_is_the_interval_mean_of_finite_losses():
    from neox.training.loop import _Window

    win = _Window()
    for loss in (4.0, float("nan"), 2.0):
        win.add(StepResult(loss, True, timers_ms={"forward": 2.0}))
    assert win.iters == 3
    assert win.loss_sum / win.loss_count == 3.0 and win.timers_ms == {"forward": 6.0}


def test_optimizer_choice_and_deepspeed_config():
    from neox.errors import ConfigError
    from neox.training.engine import runtime_config
    from neox.training.optim import build_optimizer

    base = {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "seq_length": 8,
            "tokenizer_type": "CharLevelTokenizer", "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
            "train_iters": 4, "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.8, 0.9]}},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    args = NeoXArgs.from_flat(base, world_size=1)
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, args, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert opt.param_groups[0]["weight_decay"] == args.optim.weight_decay
    ds = runtime_config(args.deepspeed_config(), opt, is_pipeline=False)
    assert "optimizer" not in ds and "scheduler" not in ds and ds["zero_force_ds_cpu_optimizer"] is False
    bad = NeoXArgs.from_flat({**base, "optimizer": {"type": "lamb", "params": {"lr": 1e-3}}}, world_size=1)
    with pytest.raises(ConfigError, match="optimizer.type"):
        build_optimizer(model, bad, torch.device("cpu"))


def test_compile_tuning_option():
    from neox.training.pretrain import compile_options

    flat = {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "seq_length": 8,
            "tokenizer_type": "CharLevelTokenizer", "train_micro_batch_size_per_gpu": 1, "train_iters": 1,
            "torch_compile": True, "torch_compile_tuning": False}  # tuning is on by default: test_fast_default.py
    assert compile_options(NeoXArgs.from_flat(flat, world_size=1)) == {}
    tuned = NeoXArgs.from_flat({**flat, "torch_compile_tuning": True}, world_size=1)
    assert compile_options(tuned) == {"coordinate_descent_tuning": True}
    every = NeoXArgs.from_flat({**flat, "torch_compile_tuning": True, "torch_compile_memory_budget": 0.5},
                               world_size=1)
    assert compile_options(every) == {"coordinate_descent_tuning": True, "activation_memory_budget": 0.5}
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from neox.training.pretrain import _apply_compile_options

    # each option names a real torch setting, and applying them sets it
    with inductor_config.patch(coordinate_descent_tuning=False), functorch_config.patch(activation_memory_budget=1.0):
        _apply_compile_options(every)
        assert inductor_config.coordinate_descent_tuning is True
        assert functorch_config.activation_memory_budget == 0.5
