"""Builds and runs the command that starts the ranks: DeepSpeed's runner (local or hostfile) or srun.

Never imports torch: deepy.py resolves and launches in a light process. The ranks get the resolved
config as a file (``--neox_args_file``, see neox.handoff) and rebuild it with
``neox.handoff.rank_args()``. The config module never calls in here: deepy.py passes
``planned_world_size`` (GPUs, hostfile, SLURM's variables) to ``NeoXArgs.from_ymls``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import netrc
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from neox.errors import ConfigError, NeoXError
from neox.handoff import ARGS_FILE_FLAG, DEFAULT_PORT, config_file_path, write_config_file

if TYPE_CHECKING:
    from neox.config.args import NeoXArgs
    from neox.config.run import LauncherConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- where the ranks run, and on which port they meet ------------------------------------------


def is_local_launch(la: LauncherConfig) -> bool:
    """True when every rank starts on this machine under DeepSpeed's runner (no hostfile, no srun)."""
    return not la.deepspeed_slurm and not (la.hostfile and parse_hostfile(la.hostfile))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether rank 0 could not listen on ``port`` here (bound as torch's TCPStore binds it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def launch_port(la: LauncherConfig, check: bool = False) -> int:
    """The rendezvous port: the user's ``master_port``; unset, a free port for a run on this machine
    alone and DEFAULT_PORT otherwise (the nodes must agree on it). ``check``: refuse a port set by
    the user that is in use on this machine, when the run is local (elsewhere rank 0 is another host)."""
    if la.master_port is None:
        return free_port() if is_local_launch(la) else DEFAULT_PORT
    if check and is_local_launch(la) and port_in_use(la.master_port):
        raise ConfigError(f"master_port: port {la.master_port} is in use on this machine (another run?); "
                          "set another or leave master_port unset to use a free one")
    return la.master_port


# ---- how many ranks ---------------------------------------------------------------------------


def detect_local_gpus(environ: Mapping[str, str] | None = None) -> int:
    """GPUs visible on this machine, without importing torch."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def parse_hostfile(path: str) -> dict[str, int]:
    """DeepSpeed hostfile ('host slots=N' per line, # comments) -> {host: slots}; {} if unreadable."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    hosts: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not match:
            raise ConfigError(f"{path}: line {number}: expected 'hostname slots=N', got {line!r}")
        hosts[match.group(1)] = int(match.group(2))
    return hosts


def _parse_spec(spec: str) -> dict[str, list[int] | None]:
    """DeepSpeed's NAME[:SLOT[,SLOT...]][@NAME...] -> {host: slots or None (all)}."""
    out: dict[str, list[int] | None] = {}
    for node in filter(None, spec.split("@")):
        host, _, slots = node.partition(":")
        out[host] = [int(s) for s in slots.split(",")] if slots else None
    return out


def filter_hosts(pool: dict[str, int], include: str | None, exclude: str | None) -> dict[str, list[int]]:
    """Apply --include / --exclude to {host: slots} -> {host: [slot ids]} (DeepSpeed's semantics)."""
    active = {host: list(range(n)) for host, n in pool.items()}
    if include:
        wanted = _parse_spec(include)
        active = {h: (sorted(s) if s is not None else active[h]) for h, s in wanted.items() if h in active}
    if exclude:
        for host, slots in _parse_spec(exclude).items():
            if host in active:
                active[host] = [] if slots is None else [s for s in active[host] if s not in slots]
    return {h: s for h, s in active.items() if s}


def planned_world_size(flat: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> tuple[int, str | None]:
    """(ranks the launcher will start, a note when it had to assume), from the launcher keys."""
    environ = os.environ if environ is None else environ
    num_gpus, num_nodes = flat.get("num_gpus"), flat.get("num_nodes", -1)
    per_node = num_gpus if num_gpus and num_gpus > 0 else None
    if flat.get("hostfile") and not flat.get("deepspeed_slurm"):
        hosts = filter_hosts(parse_hostfile(flat["hostfile"]), flat.get("include"), flat.get("exclude"))
        if hosts and (flat.get("include") or flat.get("exclude")):  # the runner ignores num_nodes/num_gpus then
            return sum(len(s) for s in hosts.values()), None
        if hosts:  # as DeepSpeed's runner: the first num_nodes hosts, num_gpus slots on each
            chosen = list(hosts.values())[: num_nodes if num_nodes and num_nodes > 0 else None]
            return sum(per_node or len(s) for s in chosen), None
    nodes = num_nodes if num_nodes and num_nodes > 0 else int(environ.get("SLURM_NNODES", 1) or 1)
    if per_node is None:
        per_node = detect_local_gpus(environ) or int(environ.get("SLURM_GPUS_ON_NODE", 0) or 0)
    model_ranks = int(flat.get("model_parallel_size") or 1) * max(int(flat.get("pipe_parallel_size") or 0), 1)
    if per_node and (flat.get("num_gpus") or (per_node * nodes) % model_ranks == 0):
        return per_node * nodes, None
    # Too few GPUs here (or none): plan the smallest world the model fits, so dry runs and tools work
    # on any machine; launching on this machine is refused by check_launchable.
    world = max(model_ranks, nodes)
    where = f"only {per_node} GPUs here" if per_node else "no GPUs detected"
    note = None
    if world > 1:
        note = f"{where} and num_gpus not set: planning {world} ranks (model_parallel_size x pipeline stages)"
    return world, note


# ---- commands -------------------------------------------------------------------------------


def _runner_flags(args: NeoXArgs) -> list[str]:
    la = args.launcher
    flags = ["--master_port", str(launch_port(la))]
    if la.master_addr:
        flags += ["--master_addr", la.master_addr]
    if la.hostfile:
        flags += ["--hostfile", la.hostfile]
    if la.include or la.exclude:  # DeepSpeed refuses them together with --num_gpus / --num_nodes
        flags += ["--include", la.include] if la.include else []
        flags += ["--exclude", la.exclude] if la.exclude else []
    else:
        if la.num_nodes and la.num_nodes > 0:
            flags += ["--num_nodes", str(la.num_nodes)]
        if la.num_gpus and la.num_gpus > 0:
            flags += ["--num_gpus", str(la.num_gpus)]
        elif not la.hostfile and detect_local_gpus() == 0:
            # CPU ranks: the DeepSpeed runner starts as many as --num_gpus says
            flags += ["--num_gpus", str(args.parallel.world_size)]
    if la.hostfile:
        flags += ["--launcher", la.launcher]
    if args.compat.get("no_ssh_check"):
        flags += ["--no_ssh_check"]
    if la.comment:
        flags += ["--comment", la.comment]
    return flags


def srun_command(args: NeoXArgs, python: str, user_script: str, rank_args: list[str]) -> list[str]:
    """srun starting one task per GPU; ranks map SLURM_* to RANK/WORLD_SIZE in neox.handoff.rank_args."""
    la, world = args.launcher, args.parallel.world_size
    cmd = ["srun", f"--ntasks={world}"]
    if la.num_nodes and la.num_nodes > 0:
        cmd += [f"--nodes={la.num_nodes}", f"--ntasks-per-node={world // la.num_nodes}"]
    if la.include:
        cmd += [f"--nodelist={la.include}"]
    if la.exclude:
        cmd += [f"--exclude={la.exclude}"]
    if la.comment:
        cmd += [f"--comment={la.comment}"]
    if la.account:
        cmd += [f"--account={la.account}"]
    return cmd + ["--export=ALL", python, "-u", user_script] + rank_args


def build_launch_command(
    args: NeoXArgs, user_script: str, user_args: list[str] | None = None, python: str | None = None,
    config_path: str | os.PathLike | None = None,
) -> list[str]:
    """The full command line deepy.py runs (and --dry-run prints). Contains no secrets and not the
    config, only the path of the file that holds it (``config_path``; None: where a launch writes it)."""
    python = python or sys.executable
    path = config_path or config_file_path(args, is_local_launch(args.launcher))
    rank_args = [ARGS_FILE_FLAG, str(path)] + list(user_args or [])
    if args.launcher.deepspeed_slurm and args.launcher.launcher.lower() == "slurm":
        return srun_command(args, python, user_script, rank_args)
    return [python, "-m", "deepspeed.launcher.runner", *_runner_flags(args), user_script, *rank_args]


# ---- environment ----------------------------------------------------------------------------


def wandb_api_key(environ: Mapping[str, str], host: str = "https://api.wandb.ai") -> str | None:
    """The W&B key from WANDB_API_KEY or ~/.netrc (as `wandb login` writes it)."""
    if environ.get("WANDB_API_KEY"):
        return environ["WANDB_API_KEY"]
    netrc_path = Path(environ.get("NETRC", Path(environ.get("HOME", "~")).expanduser() / ".netrc"))
    try:
        entry = netrc.netrc(str(netrc_path)).authenticators(urlparse(host).hostname or host)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def launch_env(args: NeoXArgs, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the ranks start with: this one, plus the W&B key, the repo on PYTHONPATH,
    and the CPU accelerator where there is no GPU."""
    env = dict(os.environ if environ is None else environ)
    key = wandb_api_key(env, args.logging.wandb_host)
    if key:
        env["WANDB_API_KEY"] = key
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if detect_local_gpus(env) == 0 and not args.launcher.hostfile:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _export_file(env: dict[str, str], names: list[str]) -> str:
    """A private DeepSpeed env file exporting ``names`` to remote nodes (with the user's own entries)."""
    lines: list[str] = []
    for candidate in (env.get("DS_ENV_FILE"), ".deepspeed_env", str(Path.home() / ".deepspeed_env")):
        if candidate and Path(candidate).is_file():
            lines += [ln for ln in Path(candidate).read_text().splitlines() if "=" in ln]
            break
    lines += [f"{n}={env[n]}" for n in names if n in env]
    fd, path = tempfile.mkstemp(prefix="neox-ds-env-")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def check_launchable(args: NeoXArgs) -> None:
    """Refuse a local launch whose ranks this machine's GPUs cannot hold: ``num_gpus`` above the GPUs
    visible, or planned ranks that differ from them (DeepSpeed would start one rank per GPU and every
    rank would then reject the config). Says in one line when the ranks run on the CPU."""
    la = args.launcher
    if not is_local_launch(la):
        return
    from neox.config.validate import input_files_exist, precision_runs_here

    input_files_exist(args)  # every rank runs here: fail before starting them
    gpus = detect_local_gpus()
    precision_runs_here(args, gpus)
    world = args.parallel.world_size
    if gpus == 0:
        asked = f"num_gpus={la.num_gpus}" if la.num_gpus and la.num_gpus > 0 else "model_parallel_size x pipeline stages"
        print(f"neox: no GPU visible: starting {world} CPU rank(s) with gloo ({asked}; without GPUs num_gpus "
              "counts CPU ranks)", file=sys.stderr, flush=True)
    elif la.num_gpus and la.num_gpus > gpus:
        raise ConfigError(f"num_gpus: {la.num_gpus} GPUs asked but this machine has {gpus} visible "
                          "(CUDA_VISIBLE_DEVICES / nvidia-smi); lower num_gpus or use a hostfile")
    elif not (la.num_gpus and la.num_gpus > 0) and gpus != world:
        raise ConfigError(
            f"num_gpus: this machine has {gpus} GPUs but the config needs {world} ranks "
            f"(model_parallel_size x pipeline stages); set num_gpus or use a hostfile"
        )


def release_shm_buffers(port: int) -> None:
    """Unlink the shared-memory buffers of DeepSpeed's CPU all-reduce that ranks meeting on ``port`` left
    (a rank that was killed never releases its own; see neox.training.engine.release_cpu_allreduce_buffer)."""
    from neox.config.deepspeed import CPU_ALLREDUCE_BUFFER, SHM_DIR

    for path in Path(SHM_DIR).glob(CPU_ALLREDUCE_BUFFER.format(uid=os.getuid(), addr="*", port=port, rank="*")):
        with contextlib.suppress(OSError):
            path.unlink()


def launch(args: NeoXArgs, user_script: str, user_args: list[str] | None = None) -> int:
    """Start the ranks and wait until none is left; returns their exit status. SIGINT/SIGTERM make the
    ranks save at the next step boundary and stop (neox.process_tree)."""
    check_launchable(args)
    la = args.launcher
    local = is_local_launch(la)
    # chosen (or checked) once: the runner's flag and the ranks' config must name the same port
    args = dataclasses.replace(args, launcher=dataclasses.replace(la, master_port=launch_port(la, check=True)))
    config_path = config_file_path(args, local)
    cmd = build_launch_command(args, user_script, user_args, config_path=config_path)
    if "deepspeed.launcher.runner" in cmd and importlib.util.find_spec("deepspeed") is None:
        raise NeoXError("deepspeed is not installed: run bash scripts/install.sh")
    env = launch_env(args)
    env_file = None
    if la.hostfile and parse_hostfile(la.hostfile) and "WANDB_API_KEY" in env:
        env_file = env["DS_ENV_FILE"] = _export_file(env, ["WANDB_API_KEY"])
        # the runner logs its pdsh/mpirun command, exports included, at INFO: keep the key out of the log
        cmd.insert(cmd.index("deepspeed.launcher.runner") + 1, "--log_level=warning")
    from neox.process_tree import run_tree

    write_config_file(args, config_path)
    try:
        return run_tree(cmd, env)
    except FileNotFoundError as err:
        raise ConfigError(f"launcher: cannot run {cmd[0]!r} ({err.strerror})") from err
    finally:
        for path in filter(None, (env_file, config_path)):
            with contextlib.suppress(OSError):
                os.unlink(path)
        if local:
            release_shm_buffers(args.launcher.master_port)
