#!/usr/bin/env python
"""Inspect a DeepSpeed / GPT-NeoX / neox checkpoint: tags, iteration, parallel layout, tensors, manifest.

    python tools/inspect_checkpoint.py CKPT_DIR                 # tags, latest, layout of the latest tag
    python tools/inspect_checkpoint.py CKPT_DIR --tag global_step100 --tensors
    python tools/inspect_checkpoint.py CKPT_DIR/global_step100 --verify   # exit 1 on any mismatch
    python tools/inspect_checkpoint.py CKPT_DIR --json          # one JSON object on stdout

The parallel layout is read from DeepSpeed's file names (``mp_rank_XX``: tensor-parallel ranks,
``layer_XX-model_YY``: pipeline layers, ``zero_pp_rank_D``: ZeRO data-parallel partitions,
``rng_state_rankR``: ranks that saved) and, when present, from neox's manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox.checkpoint import local  # noqa: E402
from neox.checkpoint import manifest as mf  # noqa: E402
from neox.errors import CheckpointError, exit_code_of  # noqa: E402

_MP = re.compile(r"^(?:zero_pp_rank_\d+_)?mp_rank_(\d+)_model_states\.pt$")
_LAYER = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_ZERO = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_RNG = re.compile(r"^rng_state_rank(\d+)\.pt$")


def layout_from_names(names: list[str]) -> dict[str, Any]:
    """Tensor/pipeline/data-parallel sizes as far as DeepSpeed's file names tell them."""
    mp = {int(m.group(1)) for n in names if (m := _MP.match(n))}
    layers = {int(m.group(1)) for n in names if (m := _LAYER.match(n))}
    mp |= {int(m.group(2)) for n in names if (m := _LAYER.match(n))}
    zero_dp = {int(m.group(1)) for n in names if (m := _ZERO.match(n))}
    rng = {int(m.group(1)) for n in names if (m := _RNG.match(n))}
    return {
        "tensor_parallel_files": len(mp),
        "pipeline": bool(layers),
        "pipeline_layer_files": len(layers),
        "zero_partitions": len(zero_dp),
        "ranks_with_rng": len(rng),
    }


def _tag_size(tag_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(tag_dir) for f in fs)


def tensors(tag_dir: str, names: list[str]) -> list[dict[str, Any]]:
    """Every tensor of the model-states files of TP rank 0 (pipeline layer files included)."""
    import torch

    out = []
    files = sorted(n for n in names if (_MP.match(n) and int(_MP.match(n).group(1)) == 0)
                   or (_LAYER.match(n) and int(_LAYER.match(n).group(2)) == 0))
    for name in files:
        problems = mf.pickle_problems(tag_dir, [name])  # DeepSpeed's objects need weights_only=False
        if problems:
            raise CheckpointError(problems[0])
        sd = torch.load(os.path.join(tag_dir, name), map_location="cpu", weights_only=False)
        module = sd.get("module", sd) if isinstance(sd, dict) else {}
        prefix = f"layer_{_LAYER.match(name).group(1)}." if _LAYER.match(name) else ""
        for key, t in (module or {}).items():
            if hasattr(t, "shape"):
                out.append({"name": prefix + key, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                            "numel": t.numel(), "file": name})
    return out


def verify(tag_dir: str, man: dict[str, Any]) -> list[str]:
    """Manifest problems, checking file by file with a progress bar and a throughput summary."""
    from tqdm import tqdm

    problems, total, start = [], 0, time.monotonic()
    for rel in tqdm(sorted(man["files"]), desc="verify", unit="file", file=sys.stderr):
        problems += mf.verify_files(tag_dir, man, [rel])
        total += man["files"][rel]["size"]
    extra = sorted(set(mf.list_files(tag_dir)) - set(man["files"]))
    problems += [f"{os.path.join(tag_dir, rel)}: not listed in the manifest" for rel in extra]
    secs = max(time.monotonic() - start, 1e-9)
    print(f"verified {len(man['files'])} files, {total / 1e6:.1f} MB in {secs:.2f}s ({total / 1e6 / secs:.1f} MB/s)",
          file=sys.stderr)
    return problems


def resolve(path: str, tag: str | None) -> tuple[str, str | None]:
    path = os.path.abspath(path.rstrip("/"))
    if local.TAG_RE.match(os.path.basename(path)) or os.path.isfile(os.path.join(path, mf.MANIFEST_NAME)):
        return os.path.dirname(path), os.path.basename(path)
    return path, tag or local.read_latest(path)


def inspect(path: str, tag: str | None = None, *, with_tensors: bool = False,
            with_verify: bool = False) -> dict[str, Any]:
    root, tag = resolve(path, tag)
    report: dict[str, Any] = {"dir": root, "latest": local.read_latest(root),
                              "tags": [{"tag": t, "iteration": n, "bytes": _tag_size(os.path.join(root, t)),
                                        "complete": os.path.isfile(os.path.join(root, t, mf.MANIFEST_NAME))}
                                       for n, t in local.list_tags(root)],
                              "partial": sorted(n for n in os.listdir(root) if n.endswith(local.PARTIAL_SUFFIX))
                              if os.path.isdir(root) else []}
    if tag is None:
        return report
    tag_dir = os.path.join(root, tag)
    if not os.path.isdir(tag_dir):
        raise SystemExit(f"inspect_checkpoint: {tag_dir}: no such tag directory")
    names = sorted(os.listdir(tag_dir))
    man = mf.read_manifest(tag_dir)
    m = local.TAG_RE.match(tag)
    info: dict[str, Any] = {"tag": tag, "iteration": (man or {}).get("iteration", int(m.group(1)) if m else None),
                            "files": len(names), "bytes": _tag_size(tag_dir),
                            "layout_from_names": layout_from_names(names),
                            "layout": (man or {}).get("layout"), "manifest": man is not None,
                            "validation_loss": (man or {}).get("validation_loss")}
    if with_tensors:
        info["tensors"] = tensors(tag_dir, names)
        info["parameters"] = sum(t["numel"] for t in info["tensors"])
    if with_verify:
        info["problems"] = verify(tag_dir, man) if man else [f"{tag_dir}: no {mf.MANIFEST_NAME} to verify against"]
    report["inspected"] = info
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"checkpoint dir: {report['dir']}   latest: {report['latest']}")
    for t in report["tags"]:
        mark = "*" if t["tag"] == report["latest"] else " "
        print(f" {mark} {t['tag']:<22} {t['bytes'] / 1e6:10.1f} MB  {'manifest' if t['complete'] else 'no manifest'}")
    for p in report["partial"]:
        print(f"   {p:<22} (interrupted save, ignored)")
    info = report.get("inspected")
    if not info:
        return
    print(f"\n{info['tag']}: iteration {info['iteration']}, {info['files']} files, {info['bytes'] / 1e6:.1f} MB")
    if info["layout"]:
        print("  layout (manifest): " + ", ".join(f"{k}={v}" for k, v in info["layout"].items()))
    print("  layout (file names): " + ", ".join(f"{k}={v}" for k, v in info["layout_from_names"].items()))
    if info.get("validation_loss") is not None:
        print(f"  fixed-batch validation loss: {info['validation_loss']}")
    for t in info.get("tensors", []):
        print(f"  {t['name']:<60} {str(t['shape']):<20} {t['dtype']}")
    if "parameters" in info:
        print(f"  {len(info['tensors'])} tensors, {info['parameters']:,} elements (TP rank 0)")
    if "problems" in info:
        for p in info["problems"]:
            print(f"  MISMATCH {p}")
        print("  manifest: OK" if not info["problems"] else f"  manifest: {len(info['problems'])} problem(s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="checkpoint dir (with 'latest') or one global_stepN dir")
    p.add_argument("--tag", help="tag to inspect (default: the one in 'latest')")
    p.add_argument("--tensors", action="store_true", help="list tensors, shapes and dtypes (TP rank 0)")
    p.add_argument("--verify", action="store_true", help="check sizes and checksums against the manifest")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    a = p.parse_args(argv)
    report = inspect(a.path, a.tag, with_tensors=a.tensors, with_verify=a.verify)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        _print(report)
    return 1 if report.get("inspected", {}).get("problems") else 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
