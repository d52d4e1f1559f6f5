"""Helpers shared by the training benchmarks: synthetic tokenizer and data, one deepy.py run, its metrics.

``bench_train.py`` (one GPU) and ``multi_gpu.py`` (2 or 8 GPUs) both run the real entry point,
``python deepy.py train.py CONFIG``, on data built here, and read ``{log_dir}/metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent


def build_tokenizer(vocab: int, path: Path) -> None:
    """A word-level tokenizer with exactly ``vocab`` entries (the last one is the EOD text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"t{i}": i for i in range(vocab - 1)}
    words["<|endoftext|>"] = vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def build_data(prefix: Path, vocab: int, tokens: int, doc_len: int = 8192, seed: int = 0) -> None:
    """Uniform random tokens (never the EOD id ``vocab - 1``): throughput only, nothing to learn."""
    from neox.data.indexed_dataset import make_builder

    rng = np.random.default_rng(seed)
    builder = make_builder(str(prefix) + ".bin", vocab_size=vocab)
    for _ in range(max(1, tokens // doc_len)):
        builder.add_item(rng.integers(0, vocab - 1, size=doc_len, dtype=np.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")


def build_markov_data(prefix: Path, vocab: int, tokens: int, doc_len: int = 8192, seed: int = 0,
                      branching: int = 4) -> None:
    """Tokens from a random first-order Markov chain: each token has ``branching`` equally likely
    successors, drawn Zipf-like so frequent tokens dominate.

    Unlike uniform tokens, the loss falls from ln(vocab) towards ln(branching) as the model learns
    the unigram and then the bigram table, so loss curves of two layouts can tell a bug from noise.
    """
    from neox.data.indexed_dataset import make_builder

    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab)  # ids 0..vocab-2; vocab-1 is EOD
    zipf = 1.0 / ranks
    succ = rng.choice(vocab - 1, size=(vocab - 1, branching), p=zipf / zipf.sum())
    docs = max(1, tokens // doc_len)
    seqs = np.empty((docs, doc_len), dtype=np.int64)
    seqs[:, 0] = rng.integers(0, vocab - 1, size=docs)
    picks = rng.integers(0, branching, size=(docs, doc_len))
    for t in range(1, doc_len):  # vectorised over documents
        seqs[:, t] = succ[seqs[:, t - 1], picks[:, t]]
    builder = make_builder(str(prefix) + ".bin", vocab_size=vocab)
    for row in seqs:
        builder.add_item(row)
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")


def ensure_dataset(work: Path, vocab: int, tokens: int, kind: str = "markov", doc_len: int = 8192) -> tuple[Path, Path]:
    """(tokenizer.json, data prefix) under ``work``, built once per (kind, vocab) and reused if big enough."""
    work.mkdir(parents=True, exist_ok=True)
    tok_path = work / f"tokenizer_{vocab}.json"
    prefix = work / f"{kind}_{vocab}_text_document"
    if not tok_path.exists():
        build_tokenizer(vocab, tok_path)
    idx, meta = Path(str(prefix) + ".idx"), Path(str(prefix) + ".tokens")
    if not idx.exists() or not meta.exists() or int(meta.read_text()) < tokens:
        doc_len = min(doc_len, max(tokens, 64))
        builder = build_markov_data if kind == "markov" else build_data
        builder(prefix, vocab, max(tokens, 4 * doc_len), doc_len=doc_len)
        meta.write_text(str(max(tokens, 4 * doc_len)))
    return tok_path, prefix


def data_overrides(tok_path: Path, prefix: Path) -> dict[str, Any]:
    """Config keys pointing a run at the synthetic data (no validation/test split)."""
    return {"tokenizer_type": "HFTokenizer", "vocab_file": str(tok_path), "merge_file": None,
            "train_data_paths": [str(prefix)], "train_data_weights": [1.0], "valid_data_paths": None,
            "test_data_paths": None, "data_path": None, "eval_interval": 10**9, "eval_iters": 0}


class DeepyError(RuntimeError):
    """deepy.py exited non-zero; ``records`` holds what metrics.jsonl had (a crash at exit keeps them all)."""

    def __init__(self, message: str, returncode: int, records: list[dict[str, Any]], completed: bool) -> None:
        super().__init__(message)
        self.returncode, self.records, self.completed = returncode, records, completed


def run_deepy(config: dict[str, Any], run_dir: Path, *, env: dict[str, str] | None = None,
              timeout: float | None = None) -> list[dict[str, Any]]:
    """Write ``config`` as one YAML file, run ``deepy.py train.py`` on it, return the training records.

    One merged file, because neox refuses a key set to two different values in two files.
    ``log_dir`` is forced to ``run_dir/logs``; the console output goes to ``run_dir/console.log``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "log_dir": str(run_dir / "logs"), "tensorboard_dir": None, "use_wandb": False}
    cfg_path = run_dir / "config.yml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=True))
    metrics = run_dir / "logs" / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    cmd = [sys.executable, str(ROOT / "deepy.py"), str(ROOT / "train.py"), str(cfg_path)]
    print("+", " ".join(cmd), flush=True)
    with open(run_dir / "console.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        console = (run_dir / "console.log").read_text()
        # the runner's last line repeats the encoded config: drop it from the message
        lines = [ln for ln in console.splitlines() if "--neox_args" not in ln]
        records = read_metrics(metrics) if metrics.exists() else []
        raise DeepyError(f"{cfg_path}: deepy.py exited {proc.returncode}\n" + "\n".join(lines[-30:]),
                         proc.returncode, records, "neox: trained" in console)
    return read_metrics(metrics)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The training records of a metrics.jsonl (eval records, which carry "split", left out)."""
    if not path.exists():
        raise RuntimeError(f"{path}: no metrics written")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if "split" not in r]


def summarize(train: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Medians over the iterations after ``warmup`` (all of them if fewer), peak memory, the loss curve."""
    measured = [r for r in train if r["iteration"] > warmup] or train

    def med(key: str) -> float:
        values = [r[key] for r in measured if r.get(key) is not None]
        return statistics.median(values) if values else 0.0

    timers: dict[str, float] = {}
    for key in sorted({k for r in measured for k in (r.get("timers_ms") or {})}):
        timers[key] = round(statistics.median(r["timers_ms"][key] for r in measured if key in (r.get("timers_ms") or {})), 2)
    tflops = med("tflops_per_gpu")
    return {"tokens_per_s": round(med("tokens_per_sec")), "tflops_per_gpu": round(tflops, 1 if tflops >= 1 else 7),
            "mfu": round(med("mfu"), 4), "step_ms": round(med("elapsed_ms_per_iteration"), 1),
            "peak_gib": round(max(r.get("max_memory_gib") or 0.0 for r in train), 2),
            "losses": [r["lm_loss"] for r in train], "measured_steps": len(measured), "timers_ms": timers}


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.time()
    return fn(*args, **kwargs), time.time() - start
