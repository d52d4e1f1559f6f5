"""DeepSpeed's run-time op builds: one line before a build starts, none when the op is prebuilt or cached, and
``optimizer.type: cpu_adam`` (GPT-NeoX's DeepSpeed CPU Adam) says it before DeepSpeed compiles it."""

from __future__ import annotations

import io

import pytest
import torch

from neox.config import NeoXArgs
from neox.training import ds_ops

LINE = "neox: compiling DeepSpeed's cpu_adam op (needs a C++ compiler, about 90 s the first time)\n"


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from neox.training import engine

    monkeypatch.setattr(engine, "installed_op", lambda name: False)  # DeepSpeed installed without compiled ops
    return tmp_path


def test_one_line_before_a_build_and_none_once_it_is_cached(empty_cache, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    out = io.StringIO()
    assert ds_ops.announce_build("cpu_adam", out, prebuilt=False) and out.getvalue() == LINE
    monkeypatch.setenv("LOCAL_RANK", "1")  # the other ranks of the node wait for the same build, silently
    out = io.StringIO()
    assert ds_ops.announce_build("cpu_adam", out, prebuilt=False) and out.getvalue() == ""
    build = _get_build_directory("cpu_adam", verbose=False)  # where torch's JIT puts the module
    assert build.startswith(str(empty_cache))
    open(f"{build}/cpu_adam.so", "wb").close()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not ds_ops.announce_build("cpu_adam", out, prebuilt=False) and out.getvalue() == ""


def test_prebuilt_op_is_not_announced(empty_cache, monkeypatch):
    out = io.StringIO()
    assert not ds_ops.announce_build("cpu_adam", out, prebuilt=True) and out.getvalue() == ""


def test_cpu_adam_optimizer_announces_before_deepspeed_builds_it(empty_cache, monkeypatch, capsys):
    import deepspeed.ops.adam

    from neox.training.optim import build_optimizer

    seen = []

    class FakeCPUAdam(torch.optim.AdamW):  # stands in for the build: records what was printed before it
        def __init__(self, params, **kw):
            seen.append(capsys.readouterr().err)
            kw.pop("adamw_mode")
            super().__init__(params, **kw)

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", FakeCPUAdam)
    base = {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "seq_length": 8,
            "tokenizer_type": "CharLevelTokenizer", "train_micro_batch_size_per_gpu": 2, "train_iters": 4,
            "optimizer": {"type": "cpu_adam", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    opt = build_optimizer(torch.nn.Linear(4, 4), NeoXArgs.from_flat(base, world_size=1), torch.device("cpu"))
    assert isinstance(opt, FakeCPUAdam) and seen == [LINE]
    # Adam with offload and no prebuilt cpu_adam stays torch AdamW: nothing to compile, nothing said
    base["optimizer"]["type"] = "Adam"
    opt = build_optimizer(torch.nn.Linear(4, 4), NeoXArgs.from_flat(base, world_size=1), torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW and capsys.readouterr().err == ""


def test_no_compiler_is_a_one_line_error_naming_the_key(empty_cache, monkeypatch, tmp_path):
    from neox.errors import ConfigError

    monkeypatch.setenv("PATH", str(tmp_path))  # neither c++ nor ninja here
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError) as err:
        ds_ops.announce_build("cpu_adam", io.StringIO(), prebuilt=False)
    assert str(err.value) == ("optimizer.type: needs DeepSpeed's cpu_adam op, which is not prebuilt and needs c++ and "
                              "ninja to compile (install a C++ compiler and ninja, or install DeepSpeed with "
                              "DS_BUILD_CPU_ADAM=1)")
