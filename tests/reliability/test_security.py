"""Loading checkpoints never runs code from them.

Every ``torch.load`` in the code base passes ``weights_only=True``, except the two documented in
docs/reliability.md; DeepSpeed's own loader (weights_only=False: its files hold its classes) only
sees files whose pickles were scanned first. The secrets check of a whole run lives in
test_training_faults.py (one run serves both).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neox.checkpoint import load_checkpoint, save_checkpoint
from neox.checkpoint import manifest as mf
from neox.checkpoint.rng import load_rng_state, save_rng_state
from neox.checkpoint.state import TrainState
from neox.errors import CheckpointError
from tests.unit.test_checkpoint import _args, init_single_rank, toy_engine, toy_run

ROOT = Path(__file__).resolve().parents[2]

# (file, enclosing function) of each torch.load allowed weights_only=False, and why (docs/reliability.md)
WEIGHTS_ONLY_EXCEPTIONS = {
    ("tools/inspect_checkpoint.py", "tensors"),  # DeepSpeed's objects; the file's pickle is scanned first
}


def _torch_loads(path: Path):
    tree = ast.parse(path.read_text())
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                value = kw.get("weights_only")
                yield func.name, node.lineno, isinstance(value, ast.Constant) and value.value is True


def test_every_torch_load_is_weights_only_or_a_documented_exception():
    sources = [*ROOT.glob("neox/**/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("megatron_core/**/*.py"),
               ROOT / "train.py", ROOT / "generate.py", ROOT / "deepy.py"]
    seen, unsafe = 0, []
    for path in sources:
        rel = str(path.relative_to(ROOT))
        for func, line, safe in _torch_loads(path):
            seen += 1
            if not safe and (rel, func) not in WEIGHTS_ONLY_EXCEPTIONS:
                unsafe.append(f"{rel}:{line} ({func})")
    assert seen >= 3 and not unsafe, unsafe


class _Evil:
    """Unpickling this runs a shell command (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module", autouse=True)
def _dist():
    init_single_rank()


def test_a_crafted_checkpoint_is_refused_before_any_code_runs(tmp_path):
    args = _args(tmp_path)
    engine, state = toy_engine(), TrainState()
    toy_run(engine, state, 1)
    save_checkpoint(engine, args.checkpoint, state, 1)
    tag = tmp_path / "ckpt" / "global_step1"
    marker = tmp_path / "pwned"
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)
    states["extra"] = _Evil(marker)
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    # an attacker who can write the file can rewrite the manifest too
    mf.write_manifest(str(tag), mf.describe_files(str(tag), mf.list_files(str(tag))), tag="global_step1", iteration=1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(toy_engine(seed=1), args.checkpoint)
    msg = str(err.value)
    assert "\n" not in msg and "mp_rank_00_model_states.pt: the pickle names posix.system" in msg, msg
    assert not marker.exists()
    # the inspect tool refuses it too
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "inspect_checkpoint.py"), str(tag), "--tensors"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "posix.system" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not marker.exists()


def test_deepspeed_zero_files_pass_the_scan_and_rng_files_load_weights_only(tmp_path):
    args = _args(tmp_path)
    engine, state = toy_engine(zero=1), TrainState()
    toy_run(engine, state, 1)
    save_checkpoint(engine, args.checkpoint, state, 1)
    tag = tmp_path / "ckpt" / "global_step1"
    files = mf.list_files(str(tag))
    assert any(f.endswith("optim_states.pt") for f in files)  # holds DeepSpeed classes (ZeroStageEnum, ...)
    assert mf.pickle_problems(str(tag), files) == []
    assert load_checkpoint(toy_engine(seed=1, zero=1), args.checkpoint).iteration == 1
    save_rng_state(str(tmp_path), 5)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "rng_state_rank5.pt"))  # NumPy
    assert load_rng_state(str(tmp_path), 5)  # weights_only=True with NumPy's state array allowed


def test_scan_allows_plain_containers_and_refuses_any_other_callable(tmp_path):
    import argparse
    import collections

    torch.save({"args": argparse.Namespace(lr=1e-3), "counts": collections.defaultdict(list, {"a": [1]}),
                "w": torch.ones(2)}, tmp_path / "megatron_style.pt")  # as Megatron-era checkpoints pickle
    torch.save({"d": collections.defaultdict(os.getcwd)}, tmp_path / "factory.pt")
    (tmp_path / "not_torch.pt").write_bytes(b"PK\x03\x04 not a zip")
    problems = mf.pickle_problems(str(tmp_path), ["megatron_style.pt", "factory.pt", "not_torch.pt"])
    assert len(problems) == 2, problems
    assert "factory.pt: the pickle names posix.getcwd" in problems[0]
    assert "not_torch.pt: not a readable torch.save file" in problems[1]
