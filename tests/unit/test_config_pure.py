"""Resolving YAML files is pure (issue 19 seam 3): ``NeoXArgs.from_ymls`` (load, derive, validate)
starts no process (no nvidia-smi), reads no hostfile and neither reads nor edits os.environ. The
world size comes from the caller: an int, the launcher's planner, or the config's own keys.

The reference is the interpreter itself: subprocess, os.environ and file opens of the hostfile are
replaced by functions that raise, so any such call fails the resolve.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import MutableMapping

import pytest

from neox.config import NeoXArgs

MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
         "train_micro_batch_size_per_gpu": 1}


class Forbidden(AssertionError):
    pass


class GuardedEnviron(MutableMapping):
    """os.environ that refuses every read and write."""

    def _refuse(self, *args, **kwargs):
        raise Forbidden(f"os.environ touched while resolving a config: {args!r}")

    __getitem__ = __setitem__ = __delitem__ = __iter__ = __len__ = __contains__ = _refuse
    get = copy = setdefault = pop = update = _refuse


@pytest.fixture()
def conf(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=4\nworker-1 slots=4\n")
    path = tmp_path / "run.yml"
    path.write_text(json.dumps({**MODEL, "hostfile": str(hostfile), "num_gpus": 2, "model_parallel_size": 2}))
    return path


@contextlib.contextmanager
def guarded(hostfile: str):
    """While inside: subprocess, os.system, os.environ and opening ``hostfile`` raise Forbidden."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _install(monkeypatch, hostfile)
        yield


def _install(monkeypatch: pytest.MonkeyPatch, hostfile: str) -> None:

    def no_process(*args, **kwargs):
        raise Forbidden(f"a process started while resolving a config: {args!r}")

    for name in ("run", "Popen", "check_output", "check_call", "call"):
        monkeypatch.setattr(subprocess, name, no_process)
    monkeypatch.setattr(os, "system", no_process)
    real_open, real_read_text = builtins.open, pathlib.Path.read_text

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == hostfile:
            raise Forbidden("the hostfile was read while resolving a config")
        return real_open(file, *args, **kwargs)

    def guarded_read_text(self, *args, **kwargs):
        if str(self) == hostfile:
            raise Forbidden("the hostfile was read while resolving a config")
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(pathlib.Path, "read_text", guarded_read_text)
    monkeypatch.setattr(os, "environ", GuardedEnviron())


def test_resolving_runs_nothing_reads_no_hostfile_touches_no_environ(conf):
    with guarded(json.loads(conf.read_text())["hostfile"]):
        args = NeoXArgs.from_ymls([str(conf)])  # world size from the config's own keys: num_gpus x 1 node
        eight = NeoXArgs.from_ymls([str(conf)], world_size=8)  # what a launcher counted, passed in
        planned = NeoXArgs.from_ymls([str(conf)], plan_world=lambda flat: (flat["num_gpus"] * 3, None))
        again = NeoXArgs.from_flat(args.to_flat(), world_size=2)
    assert args.parallel.world_size == 2 and args.parallel.data_parallel_size == 1
    assert eight.parallel.world_size == 8 and eight.parallel.data_parallel_size == 4
    assert planned.parallel.world_size == 6 and again == args


def test_guard_catches_each_access(conf):
    hostfile = json.loads(conf.read_text())["hostfile"]
    with guarded(hostfile):
        for forbidden in (lambda: os.environ.get("HOME"), lambda: subprocess.run(["nvidia-smi", "-L"]),
                          lambda: pathlib.Path(hostfile).read_text(), lambda: open(hostfile).read()):
            with pytest.raises(Forbidden):
                forbidden()
    assert os.environ.get("PATH") is not None  # restored


def test_config_package_does_not_import_the_launcher():
    code = ("import sys; from neox.config import NeoXArgs; NeoXArgs.from_flat(%r); "
            "print(sorted(m for m in sys.modules if m.startswith('neox.') and not m.startswith('neox.config')))")
    out = subprocess.run([sys.executable, "-c", code % MODEL], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['neox.errors']"
