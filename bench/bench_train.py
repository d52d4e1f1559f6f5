"""Training throughput through the real entry point, with the peers' figures from the same machine.

    python bench/bench_train.py --config configs/tinyllama_1b.yml --steps 30 --warmup 10 --log-interval 10 \
        --peers .carry/peers.py --out $OUT

Builds a synthetic mmap dataset (uniform random tokens, seeded) and a word-level tokenizer of the
config's vocabulary, runs ``deepy.py train.py CONFIG overrides.yml`` (DeepSpeed engine, mmap data
loader, bf16 with fp32 master weights, clipping and the LR schedule as the config sets them), reads
``metrics.jsonl`` and reports the median over the measured records (each covers ``--log-interval``
steps; those ending after ``--warmup`` count). With
``--peers`` it then runs the peers script on the same shape, so every figure has its peers beside it.
Variants are extra YAML overrides: ``--set key=value`` (repeatable; values parsed as YAML).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import build_data, build_tokenizer  # noqa: E402  (shared with bench/multi_gpu.py)


def model_shape(config: dict) -> dict:
    return {k: config.get(k) for k in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
                                       "intermediate_size", "seq_length", "padded_vocab_size",
                                       "train_micro_batch_size_per_gpu")}


def run_neox(args: argparse.Namespace, work: Path, out: Path) -> dict:
    from neox.config.loader import read_yaml

    base = read_yaml(args.config)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.replace("-", "_")] = yaml.safe_load(value)
    shape = {**model_shape(base), **{k: v for k, v in overrides.items() if k in model_shape(base)}}
    vocab = shape["padded_vocab_size"] = shape["padded_vocab_size"] or 32000
    seq, mbs = shape["seq_length"], shape["train_micro_batch_size_per_gpu"]
    tok_path, prefix = work / "tokenizer.json", work / "synthetic_text_document"
    if not tok_path.exists():
        build_tokenizer(vocab, tok_path)
    need = (args.steps + 2) * mbs * (seq + 1) + seq
    if not Path(str(prefix) + ".idx").exists():
        build_data(prefix, vocab, max(need, 4 * 8192))
    run_cfg = {
        "tokenizer_type": "HFTokenizer", "vocab_file": str(tok_path),
        "train_data_paths": [str(prefix)], "train_data_weights": [1.0],
        "valid_data_paths": None, "test_data_paths": None, "data_path": None,
        "train_iters": args.steps, "lr_decay_iters": args.steps, "warmup_iters": 2,
        "eval_interval": 10**9, "eval_iters": 0, "log_interval": args.log_interval, "log_dir": str(out / "logs"),
        "tensorboard_dir": None, "use_wandb": False, "save": None, "load": None, "checkpoint_factor": 10**9,
        "num_gpus": 1, "num_workers": 2, **overrides,
    }
    # One merged file: neox refuses a key set to two values in two files.
    cfg_path = work / "bench_config.yml"
    cfg_path.write_text(yaml.safe_dump({**base, **run_cfg}))
    metrics = out / "logs" / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    cmd = [sys.executable, str(ROOT / "deepy.py"), str(ROOT / "train.py"), str(cfg_path)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.time() - t0
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in recs if "split" not in r and r["iteration"] > args.warmup]
    if not train:
        raise SystemExit(f"bench: no measured iterations in {metrics}")

    def med(key: str) -> float:
        values = [r[key] for r in train if r.get(key) is not None]
        return statistics.median(values) if values else 0.0

    return {"peer": "neox_deepy", "variant": " ".join(args.set) or "config", "shape": shape,
            "tokens_per_s": round(med("tokens_per_sec")), "tflops": round(med("tflops_per_gpu"), 1),
            "mfu": round(med("mfu"), 4), "step_ms": round(med("elapsed_ms_per_iteration"), 1),
            "peak_gib": round(max(r["max_memory_gib"] for r in train), 1), "loss": round(train[-1]["lm_loss"], 3),
            "measured_steps": len(train), "wall_s": round(wall, 1)}


def run_peers(args: argparse.Namespace, shape: dict) -> list[dict]:
    cmd = [sys.executable, args.peers, "--layers", str(shape["num_layers"]), "--hidden", str(shape["hidden_size"]),
           "--heads", str(shape["num_attention_heads"]), "--kv", str(shape["num_kv_heads"] or shape["num_attention_heads"]),
           "--ffn", str(shape["intermediate_size"]), "--vocab", str(shape["padded_vocab_size"]),
           "--seq", str(shape["seq_length"]), "--mbs", str(shape["train_micro_batch_size_per_gpu"]),
           "--steps", str(args.peer_steps), "--which", args.peer_which]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tinyllama_1b.yml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="iterations left out of the medians")
    p.add_argument("--log-interval", type=int, default=4,
                   help="iterations per metrics record; the loop synchronises the GPU only at these boundaries, "
                        "so each record times that many back-to-back steps (1 = a drain after every step)")
    p.add_argument("--set", action="append", default=[], help="YAML override key=value (repeatable)")
    p.add_argument("--peers", default=None, help="path to peers.py; run on the same shape after neox")
    p.add_argument("--peer-steps", type=int, default=10)
    p.add_argument("--peer-which", default="hf,plain,plain_compile")
    p.add_argument("--work", default="/tmp/neox_bench")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    args = p.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    result = run_neox(args, work, out)
    print(json.dumps(result), flush=True)
    rows = [result]
    if args.peers:
        rows += run_peers(args, result["shape"])
    with open(out / "bench_results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\n{'who':34s} {'tok/s':>9s} {'TFLOP/s':>8s} {'ms/step':>8s} {'GiB':>6s}")
    for r in rows:
        name = r.get("peer", "?") + (f" [{r['variant']}]" if r.get("variant") and r["variant"] != "config" else "")
        print(f"{name[:34]:34s} {r.get('tokens_per_s', 0):>9} {r.get('tflops', 0):>8} {r.get('step_ms', 0):>8} "
              f"{r.get('peak_gib', 0):>6}")
    if args.peers and len(rows) > 1:
        for r in rows[1:]:
            if r.get("tflops"):
                print(f"neox / {r['peer']}: {result['tflops'] / r['tflops']:.3f}x")


if __name__ == "__main__":
    main()
