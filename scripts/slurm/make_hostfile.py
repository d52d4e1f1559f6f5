#!/usr/bin/env python3
"""Turn a SLURM allocation into a DeepSpeed hostfile and the rendezvous address and port.

Pure functions (tested without SLURM) plus a small CLI used by ``env.sh``::

    make_hostfile.py --nodelist 'gpu[01-03,07]' --slots 8 --output hosts   # writes 'gpu01 slots=8' ...
    make_hostfile.py --print master_addr                                     # first host of the job
    make_hostfile.py --print master_port --job-id 123456                     # 20000 + id mod 20000

Hostnames come from ``scontrol show hostnames`` when it is on PATH (it knows every hostlist form
the cluster uses) and otherwise from :func:`expand_nodelist`, which reads SLURM's compressed
syntax: ``node[01-03,07]``, ``a[1-2]-ib[0-1]``, ``n1,n[3-4],login``.
Standard library only: it runs before any virtual environment is trusted.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys

# A derived port keeps two jobs that share a node (e.g. --nodes=1 --gpus=4 twice) from colliding,
# and stays below the usual Linux ephemeral range (32768+).
PORT_BASE = 20000
PORT_SPAN = 12000


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"nodelist {text!r}: unbalanced ']' at position {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"nodelist {text!r}: unbalanced '['")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_ranges(spec: str, nodelist: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept from the range's first bound)."""
    out: list[str] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if m is None:
            raise ValueError(f"nodelist {nodelist!r}: bad range {part!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"nodelist {nodelist!r}: range {part!r} runs backwards")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist expression into hostnames, in SLURM's order, duplicates removed."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        # 'rack[1-2]-n[01-02]' -> pieces ['rack', ['1','2'], '-n', ['01','02']]; the product
        # varies the last bracket fastest, as scontrol does.
        pieces: list[list[str]] = []
        for text, bracket in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            if text:
                pieces.append([text])
            if bracket:
                pieces.append(_expand_ranges(bracket, nodelist))
        hosts.extend("".join(combo) for combo in itertools.product(*pieces))
    return list(dict.fromkeys(hosts))


def hostnames(nodelist: str, scontrol: str | None = None) -> list[str]:
    """The job's hostnames: ``scontrol show hostnames`` when given, else :func:`expand_nodelist`."""
    if scontrol:
        out = subprocess.run(
            [scontrol, "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout
        return list(dict.fromkeys(out.split()))
    return expand_nodelist(nodelist)


def hostfile_text(hosts: list[str], slots: int) -> str:
    """DeepSpeed hostfile: one ``host slots=N`` line per host."""
    if slots < 1:
        raise ValueError(f"slots: expected a positive number of ranks per node, got {slots}")
    if not hosts:
        raise ValueError("hosts: the node list is empty")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def master_port(job_id: int | str) -> int:
    """A rendezvous port derived from the job id (same id after a requeue -> same port)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def _count(value: str | None) -> int | None:
    """SLURM GPU counts come as '8', 'h100:8' or '8(x2)'; return the per-node number."""
    if not value:
        return None
    m = re.search(r"(\d+)(?:\(x\d+\))?\s*$", value.split(",")[0])
    return int(m.group(1)) if m else None


def slots_from_env(env: dict[str, str]) -> int:
    """Ranks per node: the job's GPUs per node, else its tasks per node, else 1."""
    for key in ("NEOX_SLOTS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        n = _count(env.get(key))
        if n:
            return n
    return 1


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"),
                   help="SLURM hostlist (default: $SLURM_JOB_NODELIST)")
    p.add_argument("--slots", type=int, default=None,
                   help="ranks per node (default: $NEOX_SLOTS, $SLURM_GPUS_ON_NODE, $SLURM_NTASKS_PER_NODE, 1)")
    p.add_argument("--output", default=None, help="write the hostfile here (default: stdout)")
    p.add_argument("--job-id", default=os.environ.get("SLURM_JOB_ID", "0"))
    p.add_argument("--no-scontrol", action="store_true", help="expand the nodelist without scontrol")
    p.add_argument("--print", choices=["hosts", "master_addr", "master_port", "num_nodes"], default=None,
                   help="print one value instead of writing a hostfile")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.print == "master_port":
        print(master_port(args.job_id))
        return 0
    if not args.nodelist:
        print("make_hostfile: error: no --nodelist and SLURM_JOB_NODELIST is unset", file=sys.stderr)
        return 2
    try:
        scontrol = None if args.no_scontrol else shutil.which("scontrol")
        hosts = hostnames(args.nodelist, scontrol)
        slots = args.slots or slots_from_env(dict(os.environ))
        text = hostfile_text(hosts, slots)
    except (ValueError, subprocess.CalledProcessError) as err:
        print(f"make_hostfile: error: {err}", file=sys.stderr)
        return 2
    if args.print == "hosts":
        print("\n".join(hosts))
    elif args.print == "master_addr":
        print(hosts[0])
    elif args.print == "num_nodes":
        print(len(hosts))
    elif args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
