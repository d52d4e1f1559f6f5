"""Run the launch command as one process tree that deepy.py can stop as a whole.

The runner starts in a session of its own, so a terminal's Ctrl-C reaches deepy.py only (DeepSpeed's
per-node launcher kills its ranks 30 s after a SIGINT or SIGTERM of its own and exits 1, which would
cut a checkpoint short and lose the ranks' status). deepy.py turns its first SIGINT or SIGTERM into a
SIGTERM to each rank: the ranks' preemption path (neox.training.preemption) saves at the next step
boundary and exits 0, the launcher and runner then exit with the ranks' status. A second signal kills
the tree. Whatever is left in the session after the runner exits is killed.

Never imports torch (deepy.py's process stays light).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGINT, signal.SIGTERM)
_PER_NODE_LAUNCHER = "deepspeed.launcher.launch"


def run_tree(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` in its own session, forwarding SIGINT/SIGTERM as above; returns, once no process of
    the session is left, the exit status (128+N when the runner died of signal N)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if len(received) == 1:
            print(f"neox: got {signal.Signals(signum).name}: the ranks save at the end of this step and stop "
                  "(signal again to kill them)", file=sys.stderr, flush=True)
            stop_ranks(proc)
        else:  # the runner is not reaped yet, so its process group id is still ours
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)

    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: no forwarding
        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # left early (an exception): take the tree down with us
            proc.kill()
            proc.wait()
        kill_session(proc.pid)
    return 128 - code if code < 0 else code


def stop_ranks(proc: subprocess.Popen) -> None:
    """SIGTERM to the ranks that DeepSpeed's per-node launcher started under ``proc``; where there are
    none here (srun, which forwards SIGTERM to its tasks; the runner over pdsh, which signals the
    remote launchers; ranks not started yet), SIGTERM to ``proc`` itself."""
    ranks = _local_ranks(proc.pid)
    for rank in ranks:
        with contextlib.suppress(OSError):
            os.kill(rank, signal.SIGTERM)
    if not ranks:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)


def _local_ranks(root: int) -> list[int]:
    import psutil  # a DeepSpeed dependency; imported here so the module loads without it

    try:
        tree = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []
    launchers, ranks = set(), []
    for p in tree:
        with contextlib.suppress(psutil.Error):
            if _PER_NODE_LAUNCHER in p.cmdline():
                launchers.add(p.pid)
    for p in tree:
        with contextlib.suppress(psutil.Error):
            if p.ppid() in launchers:
                ranks.append(p.pid)
    return ranks


def session_members(sid: int) -> list[int]:
    """Live processes of the session ``sid`` that run_tree started, after its leader was reaped.

    A process cannot join an existing session, so these are all ours, unless the leader's pid was
    reused by a process that started a session of its own (then it leads a session ``sid``: none).
    """
    import psutil

    with contextlib.suppress(OSError):
        if os.getsid(sid) == sid:
            return []
    members = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
    return members


def kill_session(sid: int) -> None:
    """SIGKILL every process left in the session ``sid`` (its leader already reaped)."""
    with contextlib.suppress(ImportError):
        for pid in session_members(sid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
