"""neox.process_tree without DeepSpeed: stand-in runners that leave a child behind or ignore SIGTERM.
The reference is the process table (psutil) and the exit status the shell would see."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from neox.process_tree import run_tree

ROOT = Path(__file__).resolve().parents[2]

# A runner that starts a long child, writes its pid, and (optionally) ignores SIGTERM and waits.
RUNNER = """
import signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write(str(child.pid))
if sys.argv[2] == "stubborn":
    child.wait()
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_for(path: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} not written"
        time.sleep(0.05)
    return int(path.read_text())


def test_what_the_runner_leaves_behind_is_killed(tmp_path):
    script, pid_file = tmp_path / "runner.py", tmp_path / "child.pid"
    script.write_text(RUNNER)
    assert run_tree([sys.executable, str(script), str(pid_file), "quick"], dict(os.environ)) == 0
    child = _wait_for(pid_file)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_second_signal_kills_the_tree_and_exit_status_says_so(tmp_path):
    script, pid_file = tmp_path / "runner.py", tmp_path / "child.pid"
    script.write_text(RUNNER)
    code = ("import os, sys; from neox.process_tree import run_tree; "
            f"sys.exit(run_tree([sys.executable, {str(script)!r}, {str(pid_file)!r}, 'stubborn'], dict(os.environ)))")
    wrapper = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stderr=subprocess.PIPE, text=True)
    try:
        child = _wait_for(pid_file)
        time.sleep(0.3)  # the runner now ignores SIGTERM
        wrapper.send_signal(signal.SIGTERM)  # first: a stop request, which this runner ignores
        time.sleep(1.0)
        assert wrapper.poll() is None and _alive(child)
        wrapper.send_signal(signal.SIGTERM)  # second: the whole tree is killed
        _, err = wrapper.communicate(timeout=30)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()
    assert wrapper.returncode == 128 + signal.SIGKILL
    assert "got SIGTERM: the ranks save at the end of this step and stop" in err
    assert not _alive(child)
