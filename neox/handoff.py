"""How the resolved config travels from deepy.py to the ranks, and what each rank reads at start.

deepy.py writes the resolved flat config as JSON to a private file (mode 0600) and passes only its
path, ``--neox_args_file PATH``, so no launch prints the ~9 KB config. Where the file lives:

- every rank on this machine (DeepSpeed's runner without a hostfile): the temporary directory;
- a hostfile (pdsh/ssh) or srun, where ranks run on other nodes: the run folder, ``log_dir``, else
  ``save``, else the current directory (DeepSpeed's pdsh runner and srun start the ranks there), which
  every node must see, as it sees the checkpoints.

deepy.py removes the file when the run ends. A rank started by hand may pass the config inline as
``--neox_args <base64 JSON>``, as GPT-NeoX passes ``--megatron_config``. Ranks never read YAML.

Never imports torch (deepy.py's process stays light).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from neox.config.args import NeoXArgs
from neox.errors import ConfigError

ARGS_FILE_FLAG = "--neox_args_file"
ARGS_FLAG = "--neox_args"
DEFAULT_PORT = 29500  # torch's and DeepSpeed's, for launches where every node must agree on the port


# ---- deepy.py's side --------------------------------------------------------------------------


def encode_config(flat: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(flat, sort_keys=True).encode()).decode()


def decode_config(encoded: str) -> dict[str, Any]:
    try:
        return json.loads(base64.urlsafe_b64decode(encoded.encode()).decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{ARGS_FLAG}: not a config encoded by neox.handoff ({err})") from err


def config_file_path(args: NeoXArgs, local: bool) -> Path:
    """Where a launch writes the ranks' config (a fresh name each call; see the module docstring)."""
    if local:
        folder = Path(tempfile.gettempdir())
    else:
        folder = Path(args.logging.log_dir or args.checkpoint.save or os.getcwd()).resolve()
    return folder / f"neox_args-{uuid.uuid4().hex[:12]}.json"


def write_config_file(args: NeoXArgs, path: Path) -> None:
    """Write the flat config readable by this user only, whole or not at all (ranks may read it at once)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(args.to_flat(), f, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:
        raise ConfigError(f"{path}: cannot write the ranks' config there ({err.strerror})") from err


# ---- on the ranks -----------------------------------------------------------------------------


def read_config_file(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"{ARGS_FILE_FLAG}: cannot read {path} ({err.strerror}); is it on a folder every "
                          "node sees?") from err
    except ValueError as err:
        raise ConfigError(f"{ARGS_FILE_FLAG}: {path} is not a config written by deepy.py ({err})") from err


def rank_args(argv: list[str] | None = None) -> NeoXArgs:
    """What every rank calls: the resolved config deepy.py handed over, re-derived with this rank's
    WORLD_SIZE (srun ranks: SLURM's variables become torch's first)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(ARGS_FILE_FLAG, default=None)
    parser.add_argument(ARGS_FLAG, default=None)
    parser.add_argument("--local_rank", type=int, default=None)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.neox_args_file:
        flat = read_config_file(known.neox_args_file)
    elif known.neox_args:
        flat = decode_config(known.neox_args)
    else:
        raise ConfigError(f"{ARGS_FILE_FLAG}: no config from the launcher (start this script with deepy.py)")
    if flat.get("deepspeed_slurm"):
        slurm_env_to_torch(os.environ, flat.get("master_port") or DEFAULT_PORT)
    if known.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(known.local_rank))
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else flat.get("world_size")
    return NeoXArgs.from_flat(flat, sources={k: "<launcher>" for k in flat}, world_size=world)


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
    return (match.group(1) + (match.group(2) or "")) if match else "127.0.0.1"


def slurm_env_to_torch(environ: dict[str, str] | os._Environ, master_port: int) -> None:
    """On an srun-started rank, set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* from SLURM's variables."""
    if "SLURM_PROCID" not in environ or "RANK" in environ:
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    environ["WORLD_SIZE"] = environ.get("SLURM_NTASKS", "1")
    environ.setdefault("MASTER_PORT", str(master_port))
    if "MASTER_ADDR" not in environ:
        environ["MASTER_ADDR"] = _first_slurm_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
