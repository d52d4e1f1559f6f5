"""fp16 at ZeRO 0: DeepSpeed 0.19's engine.backward leaves the loss unscaled while its FP16_Optimizer's step
divides by the loss scale, so neox's engine boundary scales the loss itself (neox/training/engine.py).

DeepSpeed refuses fp16 on the CPU, so these checks use DeepSpeed's real optimizer classes (made without
their constructors) inside stand-in engines; tests/gpu/test_norms_pipe_gpu.py trains the real thing
against an fp32 run on a GPU."""

from types import MethodType, SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer  # noqa: E402
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer  # noqa: E402
from deepspeed.runtime.pipe import schedule  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer  # noqa: E402

from neox.training import engine as boundary  # noqa: E402

SCALE = 4096.0


def _optimizer(cls):
    opt = object.__new__(cls)
    opt.loss_scale_config = SimpleNamespace(cur_scale=SCALE)
    return opt


class _DS:
    """A plain engine's surface that Engine reads: records what backward receives."""

    def __init__(self, optimizer, fp16=True):
        self.optimizer, self._fp16, self.torch_autocast_z0_gradscaler, self.got = optimizer, fp16, None, None

    def fp16_enabled(self):
        return self._fp16

    def backward(self, loss):
        self.got = loss

    def get_global_grad_norm(self):
        return 3.0 * SCALE if isinstance(self.optimizer, FP16_UnfusedOptimizer) else 3.0


@pytest.mark.parametrize("cls,fp16,scaled", [(FP16_Optimizer, True, True), (FP16_UnfusedOptimizer, True, True),
                                             (DeepSpeedZeroOptimizer, True, False), (FP16_Optimizer, False, False)])
def test_backward_scales_the_loss_exactly_where_deepspeed_does_not(cls, fp16, scaled):
    ds = _DS(_optimizer(cls), fp16)
    eng = boundary.Engine(ds, is_pipeline=False)
    loss = torch.tensor(0.5, dtype=torch.float16)
    eng.backward(loss)
    assert eng.loss_needs_fp16_scaling() is scaled
    assert ds.got.item() == (0.5 * SCALE if scaled else 0.5)
    ds.optimizer.loss_scale_config.cur_scale = 2 * SCALE  # the step raised the scale after the norm
    assert eng.get_global_grad_norm() == 3.0  # the unfused optimizer's scaled norm divided by the step's scale


def test_pipeline_last_stage_backward_sees_the_scaled_loss_and_keeps_the_reported_one():
    seen = []

    class _Pipe:
        _INSTRUCTION_MAP = {schedule.BackwardPass: lambda self, buffer_id: seen.append((buffer_id, self.loss.item()))}

        def __init__(self, last):
            self.optimizer, self.loss, self.last = _optimizer(FP16_Optimizer), torch.tensor(2.0), last

        def is_last_stage(self):
            return self.last

    for last, want in ((True, 2.0 * SCALE), (False, 2.0)):
        ds = _Pipe(last)
        boundary._scale_pipeline_loss(ds, lambda loss: loss.float() * SCALE)
        MethodType(ds._INSTRUCTION_MAP[schedule.BackwardPass], ds)(buffer_id=1)  # as DeepSpeed's schedule calls it
        assert seen[-1] == (1, want) and ds.loss.item() == 2.0
    assert _Pipe._INSTRUCTION_MAP[schedule.BackwardPass] is not ds._INSTRUCTION_MAP[schedule.BackwardPass]
