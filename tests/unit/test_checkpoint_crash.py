"""A process SIGKILLed in the middle of a save leaves the previous checkpoint and ``latest`` intact.

The child saves global_step2, then starts global_step4 with a write hook that signals the parent
and stalls at a chosen point (inside DeepSpeed's torch.save, or after every file but before the
manifest); the parent SIGKILLs it there. Also covers tools/inspect_checkpoint.py on the result.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from neox.checkpoint import load_checkpoint, save_checkpoint
from neox.checkpoint.state import TrainState
from neox.config.run import CheckpointConfig
from neox.errors import CheckpointError
from tests.unit.test_checkpoint import ToyArgs, init_single_rank, toy_engine, toy_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(save_dir: str, where: str, flag: str) -> None:
    """Save step 2, then hang inside the step-4 save at ``where`` after touching ``flag``."""
    import torch

    from neox.checkpoint import manifest as mf

    init_single_rank()
    engine, state = toy_engine(zero=1), TrainState()
    toy_run(engine, state, 2)
    args = ToyArgs(CheckpointConfig(save=save_dir))
    save_checkpoint(engine, args.checkpoint, state, 2)
    toy_run(engine, state, 2)

    def stall(*_a, **_k):
        open(flag, "w").close()
        time.sleep(600)

    if where == "torch_save":
        real_save = torch.save

        def slow_save(obj, f, *a, **k):  # write half of the file, then stall
            real_save(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
            stall()

        torch.save = slow_save
    else:
        mf.write_manifest = stall
    save_checkpoint(engine, args.checkpoint, state, 4)


@pytest.mark.parametrize("where", ["torch_save", "before_manifest"])
def test_sigkill_during_save_keeps_previous(tmp_path, where):
    save_dir, flag = str(tmp_path / "ckpt"), str(tmp_path / "flag")
    code = f"from tests.unit.test_checkpoint_crash import child; child({save_dir!r}, {where!r}, {flag!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.monotonic() + 120
    while not os.path.exists(flag):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert open(os.path.join(save_dir, "latest")).read() == "global_step2"
    assert os.path.isdir(os.path.join(save_dir, "global_step4.partial"))
    assert not os.path.exists(os.path.join(save_dir, "global_step4"))
    init_single_rank()
    engine = toy_engine(zero=1)
    args = ToyArgs(CheckpointConfig(save=save_dir, load=save_dir))
    assert load_checkpoint(engine, args.checkpoint).iteration == 2
    # pointing load at the interrupted tag directly is refused: it has no manifest...
    with pytest.raises(CheckpointError, match="does not exist|no model states"):
        load_checkpoint(engine, CheckpointConfig(load=os.path.join(save_dir, "global_step4")))

    # ...and the inspect tool lists it as interrupted, and verifies the good tag
    spec = importlib.util.spec_from_file_location("inspect_checkpoint", os.path.join(ROOT, "tools",
                                                                                     "inspect_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    report = tool.inspect(save_dir, with_tensors=True, with_verify=True)
    assert report["latest"] == "global_step2" and report["partial"] == ["global_step4.partial"]
    info = report["inspected"]
    assert info["iteration"] == 2 and info["problems"] == []
    assert info["layout_from_names"]["zero_partitions"] == 1 and info["layout"]["zero_stage"] == 1
    shapes = {t["name"]: t["shape"] for t in info["tensors"]}
    assert shapes == {"0.weight": [8, 4], "0.bias": [8], "2.weight": [1, 8], "2.bias": [1]}

    # a later save replaces the leftover partial directory and moves latest on
    state = TrainState(iteration=4)
    save_checkpoint(engine, args.checkpoint, state, 4)
    assert open(os.path.join(save_dir, "latest")).read() == "global_step4"
    assert not os.path.exists(os.path.join(save_dir, "global_step4.partial"))

    # corrupt a file: the tool exits 1 and names it
    victim = os.path.join(save_dir, "global_step4", "rng_state_rank0.pt")
    with open(victim, "ab") as f:
        f.write(b"x")
    assert tool.main([save_dir, "--verify", "--json"]) == 1
    report = tool.inspect(save_dir, with_verify=True)
    assert "rng_state_rank0.pt: size" in json.dumps(report["inspected"]["problems"])
