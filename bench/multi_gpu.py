"""Multi-GPU correctness and throughput (issues 9 and 12) in one command, each run through deepy.py.

    python bench/multi_gpu.py --out $OUT --anchor .carry/fsdp2_anchor.py          # 2 or 8 GPUs found
    python bench/multi_gpu.py --only parity,resume --out $OUT                      # a subset of groups
    python bench/multi_gpu.py --cpu-smoke --out /tmp/smoke                         # tiny shapes, 2 gloo ranks

Groups (bench/multi_gpu_plan.py): with 2 GPUs ``parity`` (125M, 50 steps: TP2 / PP2 / DP2 ZeRO-1 /
DP2 ZeRO-3 against the 1-GPU loss curve), ``resume`` (save at TP2, reshard to TP1, resume),
``throughput`` (Llemma-7B shape: TP2, ZeRO-1/3 DP2, checkpointing, overlap_comm on/off), ``breakdown``
(the same with synchronising timers, plus a 1-GPU compute reference), ``anchor`` (fsdp2_anchor.py
in the same call) and ``scaling`` (TinyLlama DP2 vs 1 GPU); with 8 GPUs ``3d`` (Llemma-7B TP2xPP2xDP2
and TP2xDP4 ZeRO-1 against a 2-GPU run of the same global batch), ``34b`` (24-layer Llemma-34B shape
at TP8 and TP4xPP2) and ``anchor8``. Writes ``results.jsonl`` (one row per run, loss curves
included), ``checks.jsonl`` (the comparisons) and prints a table. A failed run is recorded and the
others go on; the exit status is 1 if a run failed or a parity check missed its tolerance.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import multi_gpu_plan as plan  # noqa: E402
from bench.common import ROOT, DeepyError, data_overrides, ensure_dataset, run_deepy, summarize  # noqa: E402


@dataclass(frozen=True)
class Tol:
    """Relative tolerances on the first loss (same weights, same batch) and the mean of the last 10."""

    first: float
    last10: float


BF16 = Tol(first=5e-3, last10=2e-2)
FP32 = Tol(first=1e-4, last10=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def case_config(case: plan.Case, data: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The merged flat config of one run: the bench config, the case's layout, the run keys."""
    from neox.config.loader import read_yaml

    cfg = deep_merge(read_yaml(str(ROOT / case.config)), case.overrides)
    run = {"num_gpus": case.gpus, "train_iters": case.steps, "lr_decay_iters": case.steps,
           "warmup_iters": min(int(cfg.get("warmup_iters") or 0), max(1, case.steps // 5)),
           "master_port": free_port(), "save": None, "load": None, "finetune": False,
           "checkpoint_factor": 10**6, "launcher": "pdsh", "deepspeed_slurm": False, "log_interval": 1}
    return deep_merge(deep_merge(cfg, {**run, **data}), extra)


def vocab_of(case: plan.Case) -> int:
    from neox.config.loader import read_yaml

    return int(read_yaml(str(ROOT / case.config))["padded_vocab_size"])


def seq_of(case: plan.Case) -> int:
    from neox.config.loader import read_yaml

    return int(read_yaml(str(ROOT / case.config))["seq_length"])


def build_datasets(cases: list[plan.Case], work: Path) -> dict[int, dict[str, Any]]:
    """One Markov-chain dataset per vocabulary, big enough for the longest run on it (one epoch)."""
    need: dict[int, int] = {}
    for c in cases:
        v = vocab_of(c)
        need[v] = max(need.get(v, 0), (c.steps + 2) * c.global_batch * (seq_of(c) + 1))
    out = {}
    for vocab, tokens in need.items():
        tok, prefix = ensure_dataset(work, vocab, tokens, kind="markov")
        out[vocab] = data_overrides(tok, prefix)
    return out


def run_case(case: plan.Case, out: Path, data: dict[str, Any], extra: dict[str, Any], env: dict[str, str],
             timeout: float) -> dict[str, Any]:
    """Run one case; a row with its layout, summary and loss curve, or its error."""
    row: dict[str, Any] = {"case": case.name, "group": case.group, "gpus": case.gpus, "layout": case.layout(),
                           "global_batch": case.global_batch, "steps": case.steps, "note": case.note}
    run_dir = out / "runs" / case.name.replace("/", "__")
    start = time.time()
    try:
        try:
            train = run_deepy(case_config(case, data, extra), run_dir, env=env, timeout=timeout)
        except DeepyError as err:
            # Every step logged and the final summary printed: a crash while the ranks exit, kept visible.
            if len(err.records) != case.steps or not err.completed:
                raise
            train, row["exit_warning"] = err.records, f"exit code {err.returncode} after training completed"
        row.update(status="ok", **summarize(train, case.warmup))
        if len(row["losses"]) != case.steps:
            row.update(status="failed", error=f"{len(row['losses'])} logged iterations, expected {case.steps}")
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        row.update(status="failed", error=str(err)[-2000:])
    row["wall_s"] = round(time.time() - start, 1)
    return row


def run_resume(cases: list[plan.Case], out: Path, data: dict[str, Any], extra: dict[str, Any],
               env: dict[str, str], timeout: float) -> list[dict[str, Any]]:
    """TP2 run saves; tools/reshard_checkpoint.py writes it at TP1; both layouts resume weights-only."""
    by = {c.name.split("/")[1]: c for c in cases}
    ckpt, ckpt_tp1 = out / "runs" / "resume_ckpt_tp2", out / "runs" / "resume_ckpt_tp1"
    save = by["tp2_save"]
    rows = [run_case(save, out, data, {**extra, "save": str(ckpt), "checkpoint_factor": save.steps}, env, timeout)]
    if rows[0]["status"] != "ok":
        return rows
    cfg_file = out / "runs" / save.name.replace("/", "__") / "config.yml"
    cmd = [sys.executable, str(ROOT / "tools" / "reshard_checkpoint.py"), "--input_dir", str(ckpt),
           "--config_file", str(cfg_file), "--output_dir", str(ckpt_tp1), "--num_output_shards", "1"]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    rows.append({"case": "resume/reshard_tp2_to_tp1", "group": "resume", "gpus": 0, "layout": "tools",
                 "status": "ok" if proc.returncode == 0 else "failed", "error": proc.stderr[-2000:] or None})
    if proc.returncode != 0:
        return rows
    for name, load in (("tp2_resume", ckpt), ("tp1_resume", ckpt_tp1)):
        rows.append(run_case(by[name], out, data, {**extra, "load": str(load), "finetune": True}, env, timeout))
    return rows


def run_anchor(anchor: str | None, gpus: int, ac: bool, mbs: int, env: dict[str, str],
               timeout: float) -> dict[str, Any]:
    """fsdp2_anchor.py (PyTorch FSDP2 + torch.compile) on the Llemma-7B shape, in this same call."""
    name = f"anchor/fsdp2_{gpus}gpu_{'ac' if ac else 'noac'}_mbs{mbs}"
    row: dict[str, Any] = {"case": name, "group": "anchor", "gpus": gpus, "layout": f"FSDP2 mbs{mbs}{' AC' if ac else ''}"}
    if not anchor or not Path(anchor).is_file():
        return {**row, "status": "skipped", "error": f"--anchor {anchor!r}: no such file (copy shared/bench to .carry/)"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), anchor,
           *plan.ANCHOR_SHAPE, "--mbs", str(mbs)]
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    try:
        proc = subprocess.run(cmd, env={**os.environ, **env, "AC": "1" if ac else "0"}, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "failed", "error": "timeout"}
    found = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not found:
        return {**row, "status": "failed", "error": (proc.stderr or proc.stdout)[-2000:]}
    r = found[-1]
    return {**row, "status": "ok", "tflops_per_gpu": r.get("tflops_per_gpu"), "peak_gib": r.get("peak_gib"),
            "tokens_per_s": r.get("tokens_per_s_per_gpu", 0) * gpus, "step_ms": r.get("step_ms"),
            "mfu": round(r["tflops_per_gpu"] / 989, 4) if r.get("tflops_per_gpu") else None,
            "wall_s": round(time.time() - start, 1), "raw": r}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare_curves(name: str, ref: str, losses: list[float], ref_losses: list[float], tol: Tol) -> dict[str, Any]:
    """First-loss and last-10-mean relative differences against the reference curve, and the worst step."""
    check: dict[str, Any] = {"check": f"{name} vs {ref}", "kind": "loss_curve", "tol_first": tol.first,
                             "tol_last10": tol.last10}
    if not losses or len(losses) != len(ref_losses) or not all(map(math.isfinite, losses + ref_losses)):
        return {**check, "ok": False, "why": f"{len(losses)} vs {len(ref_losses)} losses (or non-finite)"}
    k = min(10, len(losses))
    mean, ref_mean = sum(losses[-k:]) / k, sum(ref_losses[-k:]) / k
    first, last10 = rel(losses[0], ref_losses[0]), rel(mean, ref_mean)
    worst = max(rel(a, b) for a, b in zip(losses, ref_losses))
    return {**check, "first_rel": first, "last10_rel": last10, "max_step_rel": worst,
            "ok": first <= tol.first and last10 <= tol.last10}


def checks_for(rows: list[dict[str, Any]], cases: list[plan.Case], tol: Tol) -> list[dict[str, Any]]:
    """Every loss-curve comparison the plan names (ref), the resume check, scaling and anchor ratios."""
    by = {r["case"]: r for r in rows}
    out = []
    for c in cases:
        if not c.ref or c.name not in by or c.ref not in by:
            continue
        a, b = by[c.name], by[c.ref]
        if a["status"] != "ok" or b["status"] != "ok":
            out.append({"check": f"{c.name} vs {c.ref}", "kind": "loss_curve", "ok": False, "why": "a run failed"})
            continue
        out.append(compare_curves(c.name, c.ref, a["losses"], b["losses"], tol))
    out += resume_loaded_check(by) + ratio_checks(by)
    return out


def resume_loaded_check(by: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The TP1 resume starts from the trained weights: its first loss is nearer the save run's last
    loss than its first (a resume from fresh weights would start where the save run started)."""
    save, tp1 = by.get("resume/tp2_save"), by.get("resume/tp1_resume")
    if not save or not tp1 or save["status"] != "ok" or tp1["status"] != "ok":
        return []
    start = tp1["losses"][0]
    ok = abs(start - save["losses"][-1]) < abs(start - save["losses"][0])
    return [{"check": "resume/tp1_resume starts from the trained weights", "kind": "resume", "ok": ok,
             "tp1_first_loss": start, "save_first_loss": save["losses"][0], "save_last_loss": save["losses"][-1]}]


def ratio_checks(by: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Targets of the issue, reported (they are goals, not pass/fail of the code)."""
    out = []
    one, two = by.get("tiny/1gpu"), by.get("tiny/dp2")
    if one and two and one["status"] == two["status"] == "ok" and one.get("tokens_per_s"):
        ratio = two["tokens_per_s"] / one["tokens_per_s"]
        out.append({"check": "TinyLlama DP2 / 1 GPU tokens/s", "kind": "target", "value": round(ratio, 3),
                    "target": 1.9, "met": ratio >= 1.9})
    for gpus, group in ((2, "throughput"), (8, "3d")):  # the 7B shape against the anchor on as many GPUs
        anchors = [r for r in by.values() if r["group"] == "anchor" and r["status"] == "ok" and r["gpus"] == gpus]
        ours = [r for r in by.values() if r["group"] == group and r["status"] == "ok" and r["gpus"] == gpus]
        if not anchors or not ours:
            continue
        best_anchor, best = max(anchors, key=lambda r: r["tflops_per_gpu"]), max(ours, key=lambda r: r["tflops_per_gpu"])
        ratio = best["tflops_per_gpu"] / best_anchor["tflops_per_gpu"]
        out.append({"check": f"best 7B ({best['case']}) / best anchor ({best_anchor['case']}) TFLOP/s per GPU",
                    "kind": "target", "value": round(ratio, 3), "target": 1.05, "met": ratio >= 1.05})
    for on, off in (("7b/zero1_bf16acc", "7b/zero1_bf16acc_nooverlap"), ("7b/zero3", "7b/zero3_nooverlap")):
        if by.get(on, {}).get("status") == "ok" and by.get(off, {}).get("status") == "ok" and by[off]["step_ms"]:
            out.append({"check": f"overlap_comm on/off step time {on}", "kind": "measure",
                        "value": round(by[on]["step_ms"] / by[off]["step_ms"], 3)})
    return out + derived_breakdown(by)


def derived_breakdown(by: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """compute = this run's FLOPs per GPU at the 1-GPU reference's forward+backward rate (no
    communication there); communication = measured forward+backward minus that; optimizer as timed."""
    ref = by.get("bd/compute_ref_1gpu_8l")
    if not ref or ref["status"] != "ok" or not ref.get("timers_ms"):
        return []
    t = ref["timers_ms"]
    rate = ref["tflops_per_gpu"] * ref["step_ms"] / max(t.get("forward", 0) + t.get("backward", 0), 1e-9)
    out = []
    for r in by.values():
        if r["group"] != "breakdown" or r is ref or r["status"] != "ok" or not r.get("timers_ms"):
            continue
        tm = r["timers_ms"]
        fb = tm.get("forward", 0) + tm.get("backward", 0)
        compute = r["tflops_per_gpu"] * r["step_ms"] / max(rate, 1e-9)
        comm = "tp_comm_ms" if r["layout"].startswith("TP2") else "dp_comm_ms"
        out.append({"check": f"time breakdown {r['case']}", "kind": "breakdown", "step_ms": r["step_ms"],
                    "compute_ms": round(compute, 1), comm: round(fb - compute, 1),
                    "optimizer_ms": tm.get("optimizer"), "timers_ms": tm})
    return out


def select(args: argparse.Namespace, gpus: int) -> tuple[list[plan.Case], tuple[str, ...]]:
    groups = tuple(args.only.split(",")) if args.only else plan.default_groups(gpus)
    unknown = set(groups) - set(plan.GROUPS_2GPU) - set(plan.GROUPS_8GPU)
    if unknown:
        raise SystemExit(f"--only: unknown group(s) {sorted(unknown)}; known: {plan.GROUPS_2GPU + plan.GROUPS_8GPU}")
    cases = [c for c in plan.full_plan(max(gpus, 8)) if c.group in groups]
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted or c.name.split("/")[1] in wanted]
    if args.steps:
        cases = [dataclasses.replace(c, steps=args.steps) for c in cases]
    if args.cpu_smoke:
        cases = [plan.smoke_case(c, args.smoke_steps) for c in cases]
    too_big = [c.name for c in cases if c.gpus > gpus]
    if too_big:
        raise SystemExit(f"{gpus} GPUs (or CPU ranks) here; these runs need more: {', '.join(too_big)}")
    return cases, groups


class Recorder:
    """Appends each row to results.jsonl as soon as it exists (a run killed at its time limit keeps
    what finished) and refuses new runs once ``budget`` seconds have passed."""

    def __init__(self, out: Path, meta: dict[str, Any], budget: float | None) -> None:
        self.path, self.meta, self.budget, self.start = out / "results.jsonl", meta, budget, time.time()
        self.rows: list[dict[str, Any]] = []

    def over_budget(self) -> bool:
        return self.budget is not None and time.time() - self.start > self.budget

    def add(self, *rows: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            for r in rows:
                self.rows.append(r)
                f.write(json.dumps({**r, **self.meta}) + "\n")
                print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)

    def skip(self, name: str, group: str) -> None:
        self.add({"case": name, "group": group, "gpus": 0, "layout": "", "status": "skipped",
                  "error": f"--budget {self.budget:.0f} s spent"})


def run_all(cases: list[plan.Case], groups: tuple[str, ...], args: argparse.Namespace, gpus: int,
            extra: dict[str, Any], env: dict[str, str], rec: Recorder) -> None:
    """Anchors first (short, and the ratio needs them), then the cases, then the resume chain."""
    out = Path(args.out)
    datasets = build_datasets(cases, Path(args.work))
    anchors = [(2, False, 1), (2, True, 2)] if "anchor" in groups else []
    anchors += [(8, True, 2)] if "anchor8" in groups and gpus >= 8 else []
    for n, ac, mbs in anchors:
        name = f"anchor/fsdp2_{n}gpu_{'ac' if ac else 'noac'}_mbs{mbs}"
        if args.cpu_smoke:
            rec.add({"case": name, "group": "anchor", "gpus": n, "layout": "FSDP2", "status": "skipped",
                     "error": "needs CUDA + NCCL"})
        elif rec.over_budget():
            rec.skip(name, "anchor")
        else:
            rec.add(run_anchor(args.anchor, n, ac, mbs, env, args.timeout))
    resume = [c for c in cases if c.group == "resume"]
    bar = tqdm([c for c in cases if c.group != "resume"], desc="multi-GPU runs", unit="run")
    for case in bar:
        bar.set_postfix_str(case.name)
        if rec.over_budget():
            rec.skip(case.name, case.group)
            continue
        rec.add(run_case(case, out, datasets[vocab_of(case)], extra, env, args.timeout))
    if resume and rec.over_budget():
        rec.skip("resume/*", "resume")
    elif resume:
        rec.add(*run_resume(resume, out, datasets[vocab_of(resume[0])], extra, env, args.timeout))


def print_table(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    head = f"{'case':28s} {'gpus':>4s} {'layout':26s} {'tok/s':>9s} {'TFLOP/s/GPU':>11s} {'MFU':>6s} " \
           f"{'GiB':>6s} {'ms/step':>8s} {'loss first -> last':>20s} status"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        losses = r.get("losses") or []
        curve = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
        mfu = f"{r['mfu']:.3f}" if isinstance(r.get("mfu"), (int, float)) else ""
        print(f"{r['case'][:28]:28s} {r.get('gpus', 0):>4} {r.get('layout', '')[:26]:26s} {r.get('tokens_per_s', ''):>9} "
              f"{r.get('tflops_per_gpu', ''):>11} {mfu:>6s} {r.get('peak_gib', ''):>6} {r.get('step_ms', ''):>8} "
              f"{curve:>20s} {r['status']}{' (' + r['exit_warning'] + ')' if r.get('exit_warning') else ''}")
    curves = [r for r in rows if r.get("losses") and r["group"] in ("parity", "resume", "3d")]
    if curves:
        print("\nloss curves (every 10th step, and the last):")
        for r in curves:
            pts = [f"{i + 1}:{v:.4f}" for i, v in enumerate(r["losses"]) if i % 10 == 0 or i == len(r["losses"]) - 1]
            print(f"  {r['case']:28s} " + " ".join(pts))
    print("\nchecks:")
    for c in checks:
        extra = {k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in c.items() if k not in ("check", "kind", "timers_ms")}
        print(f"  [{c['kind']}] {c['check']}: {extra}")


def detect_gpus() -> int:
    from neox.launcher import detect_local_gpus

    return detect_local_gpus()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=None, help="GPUs (CPU ranks with --cpu-smoke) to plan for; "
                   "default: the GPUs found (2 with --cpu-smoke)")
    p.add_argument("--only", default=None, help="comma-separated groups: " + ",".join(plan.GROUPS_2GPU + plan.GROUPS_8GPU))
    p.add_argument("--cases", default=None, help="comma-separated case names within the groups (e.g. 1gpu,tp2)")
    p.add_argument("--steps", type=int, default=None, help="override every run's iterations")
    p.add_argument("--set", action="append", default=[], help="YAML override for every run, key=value (repeatable)")
    p.add_argument("--anchor", default=".carry/fsdp2_anchor.py", help="fsdp2_anchor.py (next to its peers.py)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 shapes on gloo CPU ranks: the plan end to end")
    p.add_argument("--smoke-steps", type=int, default=10)
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--budget", type=float, default=None,
                   help="start no run after this many seconds (the table still prints); e.g. 480 under a 600 s limit")
    p.add_argument("--work", default=None, help="synthetic data folder (default: runs/multi_gpu/data)")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/multi_gpu"))
    args = p.parse_args(argv)
    args.work = args.work or str(ROOT / "runs" / "multi_gpu" / ("data_smoke" if args.cpu_smoke else "data"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"} if args.cpu_smoke else {}
    gpus = args.gpus or (2 if args.cpu_smoke else detect_gpus())
    if gpus < 2:
        raise SystemExit(f"bench/multi_gpu.py: {gpus} GPU(s) found; needs 2 or 8 (or --cpu-smoke)")
    cases, groups = select(args, gpus)
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key.replace("-", "_")] = yaml.safe_load(value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tol = FP32 if args.cpu_smoke else BF16
    rec = Recorder(out, {"cpu_smoke": args.cpu_smoke, "tolerance": asdict(tol)}, args.budget)
    run_all(cases, groups, args, gpus, extra, env, rec)
    rows = rec.rows
    checks = checks_for(rows, cases, tol)
    with open(out / "checks.jsonl", "a") as f:
        for c in checks:
            f.write(json.dumps(c) + "\n")
    print_table(rows, checks)
    failed = [r["case"] for r in rows if r["status"] == "failed"]
    missed = [c["check"] for c in checks if c.get("ok") is False]
    secs = time.time() - rec.start
    print(f"\n{len(rows)} runs in {secs:.0f} s ({len(rows) / max(secs, 1e-9) * 60:.1f} runs/min); "
          f"failed: {failed or 'none'}; checks out of tolerance: {missed or 'none'}; results in {out}")
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
