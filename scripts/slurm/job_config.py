#!/usr/bin/env python3
"""Write the per-job config fragment that the SLURM scripts add after the user's configs.

The user's YAML files stay untouched; this fragment adds only the keys they leave unset:

- ``hostfile``, ``master_addr``, ``master_port``: this allocation's hosts and rendezvous;
- ``launcher: slurm`` + ``deepspeed_slurm: true`` for the srun path, with ``num_nodes`` and ``num_gpus``
  (ranks per node) from the allocation, since srun does not read the hostfile;
- ``kill_switch_path``: a file on the shared run directory that the batch shell touches when SLURM
  warns of preemption or the time limit (``--signal=B:USR1@120``); every rank polls it at each
  iteration boundary, saves a checkpoint and exits, which works for ranks started over ssh too;
- ``load: <save>`` once ``<save>/latest`` exists, so a requeued job resumes where it stopped.

A key the user did set wins (the loader would reject the same key with two values anyway).
Prints shell assignments (``NEOX_OVERRIDES=...``) for ``env.sh`` to ``eval``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

MODES = ("auto", "hostfile", "srun")


@dataclass
class JobPlan:
    """What the job adds to the user's config, and what the batch shell needs to know."""

    mode: str
    overrides: dict[str, Any]
    kill_switch: str
    save: str | None
    notes: list[str] = field(default_factory=list)


def resolve_mode(requested: str, user: dict[str, Any]) -> str:
    """'auto' follows the config: ``deepspeed_slurm: true`` means srun, anything else the hostfile path."""
    if requested not in MODES:
        raise ValueError(f"NEOX_LAUNCH={requested!r}: expected one of {', '.join(MODES)}")
    if requested != "auto":
        return requested
    return "srun" if user.get("deepspeed_slurm") is True else "hostfile"


def _launcher_keys(mode: str, user: dict[str, Any]) -> dict[str, Any]:
    """srun needs ``launcher: slurm`` + ``deepspeed_slurm: true``; the hostfile path needs neither."""
    if mode == "hostfile":
        if user.get("deepspeed_slurm") is True:
            raise ValueError("deepspeed_slurm: the config sets true but NEOX_LAUNCH=hostfile; "
                             "remove deepspeed_slurm from the config or use NEOX_LAUNCH=srun")
        return {}
    out: dict[str, Any] = {}
    for key, value in {"launcher": "slurm", "deepspeed_slurm": True}.items():
        if key not in user:
            out[key] = value
        elif user[key] != value:
            raise ValueError(
                f"{key}: the config sets {user[key]!r} but NEOX_LAUNCH=srun needs {value!r}; "
                f"remove {key} from the config or use NEOX_LAUNCH=hostfile"
            )
    return out


def plan_job(
    user: dict[str, Any],
    *,
    mode: str,
    hostfile: str,
    master_addr: str,
    master_port: int,
    kill_switch: str,
    slots: int | None = None,
    num_nodes: int | None = None,
) -> JobPlan:
    """The job's additions to ``user`` (the merged flat user config). Pure apart from one stat."""
    mode = resolve_mode(mode, user)
    overrides = _launcher_keys(mode, user)
    notes = []
    job_keys: dict[str, Any] = {"hostfile": hostfile, "master_addr": master_addr, "master_port": master_port}
    if mode == "srun":  # srun does not read the hostfile: give it the allocation's shape
        job_keys.update(num_gpus=slots, num_nodes=num_nodes)
    for key, value in job_keys.items():
        if user.get(key) in (None, "", -1) and value is not None:
            overrides[key] = value
        elif key == "hostfile":
            notes.append(f"hostfile: the config names {user[key]}; this job's hosts are in {hostfile}")
    if user.get("kill_switch_path"):
        kill_switch = str(user["kill_switch_path"])
    else:
        overrides["kill_switch_path"] = kill_switch
    save = user.get("save") or None
    if save is None:
        notes.append("save: not set, so a preempted or timed-out job cannot resume")
    elif os.path.isfile(os.path.join(str(save), "latest")):
        if user.get("load") in (None, ""):
            overrides["load"] = str(save)
            notes.append(f"load: resuming from {save} (tag in {os.path.join(str(save), 'latest')})")
        elif os.path.abspath(str(user["load"])) != os.path.abspath(str(save)):
            notes.append(f"load: the config loads {user['load']}, so the checkpoints of this run in {save} "
                         "are not resumed (drop load from the config to resume them)")
    return JobPlan(mode=mode, overrides=overrides, kill_switch=kill_switch, save=save, notes=notes)


def read_user_config(configs: list[str], conf_dir: str | None) -> dict[str, Any]:
    """The user's configs merged as deepy.py merges them (canonical flat keys)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if repo not in sys.path:  # run as a script from the checkout, neox maybe not pip-installed
        sys.path.insert(0, repo)
    from neox.config.loader import merge_files, resolve_paths

    merged, _sources = merge_files(resolve_paths(configs, conf_dir))
    return merged


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default=os.environ.get("NEOX_LAUNCH", "auto"), choices=MODES)
    p.add_argument("--run-dir", required=True, help="shared directory of this job (fragment, kill switch)")
    p.add_argument("--hostfile", required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--slots", type=int, default=None, help="ranks per node (srun path)")
    p.add_argument("--num-nodes", type=int, default=None, help="nodes of the job (srun path)")
    p.add_argument("-d", "--conf_dir", default=None)
    p.add_argument("configs", nargs="+")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        user = read_user_config(args.configs, args.conf_dir)
        plan = plan_job(
            user, mode=args.mode, hostfile=os.path.abspath(args.hostfile), master_addr=args.master_addr,
            master_port=args.master_port, kill_switch=os.path.join(os.path.abspath(args.run_dir), "STOP"),
            slots=args.slots, num_nodes=args.num_nodes,
        )
    except Exception as err:  # noqa: BLE001 - one line for the job log, whatever went wrong
        print(f"job_config: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    os.makedirs(args.run_dir, exist_ok=True)
    fragment = os.path.join(os.path.abspath(args.run_dir), "job_overrides.yml")
    with open(fragment, "w") as f:
        f.write("# written by scripts/slurm/job_config.py for this job; regenerated on every (re)start\n")
        json.dump(plan.overrides, f, indent=2, sort_keys=True)
        f.write("\n")
    for note in plan.notes:
        print(f"job_config: {note}", file=sys.stderr)
    values = {"NEOX_OVERRIDES": fragment, "NEOX_MODE": plan.mode, "NEOX_KILL_SWITCH": plan.kill_switch,
              "NEOX_SAVE": plan.save or ""}
    for key, value in values.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
