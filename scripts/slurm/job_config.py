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

A key the user did set wins, except when resuming: a config that starts from other weights
(``load: base``, ``finetune: true``) continues from ``save`` instead, with ``finetune: false``
(``NEOX_RESUME=0`` turns this off). Then, since the loader rejects a key set twice with different
values, deepy.py gets one merged config file instead of the user's files plus the fragment.
Prints shell assignments (``NEOX_DEEPY_ARGS=(...)``, ``NEOX_MODE=...``) for ``env.sh`` to ``eval``.
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
    replaced: dict[str, Any] = field(default_factory=dict)
    """User keys this start must change; non-empty means deepy.py gets one resolved config file."""


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
    resume: bool = True,
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
    replaced: dict[str, Any] = {}
    if save is None:
        notes.append("save: not set, so a preempted or timed-out job cannot resume")
    elif resume and os.path.isfile(os.path.join(str(save), "latest")):
        replaced = _resume_keys(user, str(save), overrides, notes)
    return JobPlan(mode=mode, overrides=overrides, kill_switch=kill_switch, save=save, notes=notes,
                   replaced=replaced)


def _resume_keys(user: dict[str, Any], save: str, overrides: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """``save/latest`` exists, so this start continues that run: load it with its full state.

    Adds ``load`` to ``overrides`` when the config leaves it unset; returns the user keys that must
    change instead (a ``load`` of base weights with ``finetune: true`` was only the starting point).
    """
    notes.append(f"load: resuming from {save} (tag in {os.path.join(save, 'latest')})")
    replaced: dict[str, Any] = {}
    if user.get("load") in (None, ""):
        overrides["load"] = save
    elif os.path.abspath(str(user["load"])) != os.path.abspath(save):
        replaced["load"] = save
    if user.get("finetune") is True:
        replaced["finetune"] = False
    if user.get("no_save_optim") is True and "no_load_optim" not in user:
        overrides["no_load_optim"] = True  # the run saved no optimizer state to load
    if replaced:
        notes.append(f"replacing {', '.join(f'{k}: {user[k]!r}' for k in replaced)} of the config, which "
                     "named the run's starting point (NEOX_RESUME=0 keeps them)")
    return replaced


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
            slots=args.slots, num_nodes=args.num_nodes, resume=os.environ.get("NEOX_RESUME", "1") != "0",
        )
    except Exception as err:  # noqa: BLE001 - one line for the job log, whatever went wrong
        print(f"job_config: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"job_config: {note}", file=sys.stderr)
    deepy_args = write_job_config(plan, user, args)
    values = {"NEOX_MODE": plan.mode, "NEOX_KILL_SWITCH": plan.kill_switch, "NEOX_SAVE": plan.save or ""}
    for key, value in values.items():
        print(f"{key}={shlex.quote(value)}")
    print(f"NEOX_DEEPY_ARGS=({' '.join(shlex.quote(a) for a in deepy_args)})")
    return 0


def write_job_config(plan: JobPlan, user: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Write the job's config file; return the config arguments for deepy.py.

    Normally a fragment of the added keys goes after the user's own arguments (so errors still name
    their files). When user keys must change, the loader would reject a second value, so deepy.py
    gets the merged config with the changes as its only file.
    """
    run_dir = os.path.abspath(args.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    header = "# written by scripts/slurm/job_config.py for this job; regenerated on every (re)start\n"
    merged, fragment = os.path.join(run_dir, "job_config.yml"), os.path.join(run_dir, "job_overrides.yml")
    if plan.replaced:
        path, content = merged, {**user, **plan.overrides, **plan.replaced}
        deepy_args = [path]
    else:
        path, content = fragment, plan.overrides
        deepy_args = (["-d", args.conf_dir] if args.conf_dir else []) + list(args.configs) + [path]
    for stale in {merged, fragment} - {path}:  # left by an earlier start; only one is in use
        if os.path.exists(stale):
            os.remove(stale)
    with open(path, "w") as f:
        f.write(header)
        json.dump(content, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    return deepy_args


if __name__ == "__main__":
    sys.exit(main())
