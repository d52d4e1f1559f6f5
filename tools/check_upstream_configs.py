#!/usr/bin/env python
"""Run every YAML file of a GPT-NeoX ``configs/`` folder through ``deepy.py --dry-run`` and count the outcomes.

    python tools/check_upstream_configs.py --configs PATH/TO/gpt-neox/configs [--json]

A model config (one that sets ``num_layers``) is resolved alone; an overlay (data paths, logging, text
generation, ...) is resolved after a model config: its folder's own model config when it has one (llama/7B.yml
for llama/train_config.yml), else ``--base`` (125M.yml), as GPT-NeoX's README combines them. Each outcome is one
of: ``resolves``; ``refused rightly``: a one-line neox error naming a feature neox does not implement
(REFUSED_FEATURES); ``refused wrongly``: any other error, a multi-line message or a traceback. Exits 1 when
something is refused wrongly. Nothing is launched and no GPU is needed (the dry run plans GPU runs on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from anywhere: deepy.py and neox/ of this checkout

# what neox does not implement, as its one-line errors start (after the file name): architectures neox lacks,
# and switches a user turns on that neox refuses rather than ignores (GPT-NeoX issue 18, item 12)
REFUSED_FEATURES = {
    "mixture of experts": r"^moe_\w+:",
    "Mamba": r"^attention_config: attention type 'mamba'",
    "RWKV": r"^attention_config: attention type 'rwkv'",
    "gMLP": r"^attention_config: attention type '(gmlp|amlp)'",
    "sparse attention": r"^sparsity_config:|^attention_config: attention type '(sparse_\w+|bigbird|bslongformer)'",
    "bitsandbytes optimizer": r"^use_bnb_optimizer:",
    "Comet logging": r"^use_comet:",
    "memory profiling": r"^memory_profiling:",
}


def classify(paths: list[Path]) -> dict[str, list[Path]]:
    """{"models": [...], "overlays": [...]} by whether a file sets num_layers."""
    from neox.config.keys import canonical
    from neox.config.loader import read_yaml

    out: dict[str, list[Path]] = {"models": [], "overlays": []}
    for path in paths:
        keys = {canonical(k) for k in read_yaml(path)}
        out["models" if "num_layers" in keys else "overlays"].append(path)
    return out


def base_for(overlay: Path, models: list[Path], default: Path, root: Path) -> Path:
    """The model config an overlay is combined with: one of its own family folder (llama/7B.yml for
    llama/train_config.yml) or named like it (llama_7B.yml for llama_train_config.yml), else ``default``."""
    prefix = overlay.name.split("_")[0] + "_" if "_" in overlay.name else None
    mates = [m for m in models if m.parent == overlay.parent
             and (overlay.parent != root or (prefix is not None and m.name.startswith(prefix)))]
    mates.sort(key=lambda m: ("7B" not in m.name, m.name))
    return mates[0] if mates else default


def dry_run(files: list[Path], script: str = "train.py") -> tuple[str, str]:
    """("resolves" | "refused" | "crashed", the one-line message or the traceback's last line)."""
    import deepy
    from neox.errors import NeoXError

    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = deepy.main(["--dry-run", script, *map(str, files)])
    except NeoXError as err:
        return "refused", str(err)
    except Exception:  # noqa: BLE001 - a traceback is what this tool reports as refused wrongly
        return "crashed", traceback.format_exc().strip().splitlines()[-1]
    if code != 0:
        return "crashed", f"exit code {code}"
    json.loads(stdout.getvalue())  # the dry run's contract: one JSON object
    return "resolves", ""


def verdict(status: str, message: str) -> tuple[str, str | None]:
    """("resolves" | "refused rightly" | "refused wrongly", the feature named by a right refusal)."""
    if status == "resolves":
        return "resolves", None
    if status == "refused" and "\n" not in message:
        said = re.sub(r"^\S+\.ya?ml: ", "", message)  # the file that set the key
        for feature, pattern in REFUSED_FEATURES.items():
            if re.search(pattern, said):
                return "refused rightly", feature
    return "refused wrongly", None


def sweep(configs: Path, base: str | Path = "125M.yml") -> list[dict[str, object]]:
    """One record per YAML file under ``configs``: its files as resolved, status, verdict, message."""
    paths = sorted(p for p in configs.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())
    groups = classify(paths)
    default = configs / base  # an absolute base stays as it is
    records = []
    for path in paths:
        files = [path] if path in groups["models"] else [base_for(path, groups["models"], default, configs), path]
        status, message = dry_run(files)
        outcome, feature = verdict(status, message)
        records.append({"file": str(path.relative_to(configs)), "with": [_name(f, configs) for f in files[:-1]],
                        "outcome": outcome, "feature": feature, "message": message})
    return records


def _name(path: Path, configs: Path) -> str:
    return str(path.relative_to(configs)) if path.is_relative_to(configs) else str(path)


def summary(records: list[dict[str, object]]) -> str:
    counts = {k: sum(r["outcome"] == k for r in records) for k in ("resolves", "refused rightly", "refused wrongly")}
    models = sum(not r["with"] for r in records)
    return (f"{len(records)} files ({models} model configs, {len(records) - models} overlays): "
            f"{counts['resolves']} resolve, {counts['refused rightly']} refused rightly in one line, "
            f"{counts['refused wrongly']} refused wrongly")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", required=True, help="a local copy of GPT-NeoX's configs/ folder")
    p.add_argument("--base", default="125M.yml",
                   help="model config the overlays are combined with (relative to --configs, or a path)")
    p.add_argument("--json", action="store_true", help="print the records as one JSON list")
    a = p.parse_args(argv)
    configs = Path(a.configs).resolve()
    if not (configs / a.base).is_file():
        print(f"neox: error: --base: {configs / a.base}: file not found", file=sys.stderr)
        return 2
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # plan as on a CPU login node, whatever this machine has
    records = sweep(configs, a.base)
    if a.json:
        print(json.dumps(records, indent=2))
    else:
        for r in records:
            extra = f" (with {', '.join(r['with'])})" if r["with"] else ""
            why = f": {r['message']}" if r["message"] else ""
            print(f"{r['outcome']:16} {r['file']}{extra}{why}")
    print(summary(records), file=sys.stderr)
    return 1 if any(r["outcome"] == "refused wrongly" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
