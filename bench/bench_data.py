#!/usr/bin/env python
"""Data pipeline benchmarks: preprocessing throughput and index building.

    python bench/bench_data.py [--chars 8000000] [--tokens 1e9]

1. Preprocessing tokens/s with 1 and 2 workers (tools/preprocess_data.py's engine) against a bare
   single-process loop (json.loads + tokenize, nothing written) over the same jsonl file: text from
   the Python standard library, the quickstart SentencePiece tokenizer.
2. Building the doc/sample/shuffle indices for a synthetic dataset of ``--tokens`` tokens (document
   sizes drawn log-normally), uncached and through the .npy cache (build + save, then load).
3. Reading GPT samples (``GPTDataset.__getitem__``) from the quickstart corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox.data import gpt_dataset as gd  # noqa: E402
from neox.data.indexed_dataset import MMapIndexedDataset  # noqa: E402
from neox.data.preprocess import preprocess  # noqa: E402
from neox.tokenizer.sentencepiece import SPMTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "datasets", "quickstart")


def write_corpus(path: str, max_chars: int) -> int:
    """Standard-library sources as jsonl, one file per document, up to ``max_chars``."""
    from tools.build_quickstart_data import stdlib_files

    root, chars, docs = sysconfig.get_paths()["stdlib"], 0, 0
    with open(path, "w") as out:
        for rel in stdlib_files(root):
            try:
                text = open(os.path.join(root, rel), encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            out.write(json.dumps({"text": text}) + "\n")
            chars, docs = chars + len(text), docs + 1
            if chars >= max_chars:
                break
    return docs


def bare_loop(path: str, tok: SPMTokenizer) -> tuple[int, float]:
    start, tokens = time.perf_counter(), 0
    with open(path, "rb") as f:
        for line in f:
            text = json.loads(line)["text"]
            tokens += len(tok.tokenize(text)) + 1 if text else 0
    return tokens, time.perf_counter() - start


def bench_preprocess(chars: int, worker_counts: list[int]) -> list[dict]:
    tok = SPMTokenizer(os.path.join(QUICKSTART, "tokenizer.model"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.jsonl")
        docs = write_corpus(path, chars)
        tokens, dt = bare_loop(path, tok)
        rows.append({"what": "bare loop (json.loads + tokenize, 1 process)", "docs": docs, "tokens": tokens,
                     "seconds": dt, "tokens_per_s": tokens / dt})
        for workers in worker_counts:
            stats = preprocess(path, os.path.join(tmp, f"w{workers}"), tok, append_eod=True, workers=workers,
                               progress=False)
            rows.append({"what": f"preprocess, workers={workers}", "docs": stats.docs, "tokens": stats.tokens,
                         "seconds": stats.seconds, "tokens_per_s": stats.tokens / stats.seconds})
    return rows


def synthetic_sizes(total_tokens: int, mean: float, rng: np.random.RandomState) -> np.ndarray:
    sigma = 1.0
    n = int(total_tokens / mean)
    sizes = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, size=n)
    return np.maximum(sizes, 1).astype(np.int32)


def bench_index(total_tokens: int) -> list[dict]:
    rng = np.random.RandomState(0)
    rows = []
    for mean_doc, seq_length, epochs in ((1000, 2048, 1), (250, 4096, 1), (1000, 2048, 3)):
        sizes = synthetic_sizes(total_tokens, mean_doc, rng)
        docs = np.arange(len(sizes))
        tokens = int(sizes.sum(dtype=np.int64))
        num_samples = (epochs * tokens - 1) // seq_length
        start = time.perf_counter()
        doc_idx, sample_idx, shuffle_idx = gd.build_index_mappings(docs, sizes, num_samples, seq_length, seed=1234)
        built = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            prefix = os.path.join(tmp, "synthetic")
            start = time.perf_counter()
            gd.cached_index_mappings("train", prefix, docs, sizes, num_samples, seq_length, 1234)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            gd.cached_index_mappings("train", prefix, docs, sizes, num_samples, seq_length, 1234)
            warm = time.perf_counter() - start
        rows.append({"tokens": tokens, "documents": len(sizes), "mean_doc_tokens": mean_doc,
                     "seq_length": seq_length, "epochs": epochs, "samples": len(shuffle_idx),
                     "build_s": built, "build_and_cache_s": cold, "load_cached_s": warm})
    return rows


def bench_blend(size: int = 50_000_000) -> dict:
    from neox.data.blendable import blending_indices

    start = time.perf_counter()
    blending_indices(np.array([0.5, 0.3, 0.15, 0.05]), size)
    return {"samples": size, "datasets": 4, "seconds": time.perf_counter() - start}


def bench_reads(n: int = 20_000, seq_length: int = 2048) -> dict:
    prefix = os.path.join(QUICKSTART, "pystdlib_train_text_document")
    ds = MMapIndexedDataset(prefix)
    with tempfile.TemporaryDirectory() as tmp:
        g = gd.GPTDataset("train", prefix, np.arange(len(ds)), ds, n, seq_length, 1234, cache_dir=tmp)
        start = time.perf_counter()
        for i in range(n):
            g[i]
        dt = time.perf_counter() - start
    return {"samples": n, "seq_length": seq_length, "samples_per_s": n / dt,
            "tokens_per_s": n * (seq_length + 1) / dt}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chars", type=int, default=8_000_000, help="characters of text for preprocessing")
    p.add_argument("--tokens", type=float, default=1e9, help="tokens of the synthetic dataset for index building")
    p.add_argument("--workers", default="1,2", help="comma-separated preprocessing worker counts")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "numpy": np.__version__, "loadavg": os.getloadavg()}
    print(json.dumps(meta))
    pre = bench_preprocess(args.chars, [int(w) for w in args.workers.split(",")])
    print("| run | documents | tokens | seconds | tokens/s |\n|---|---:|---:|---:|---:|")
    for r in pre:
        print(f"| {r['what']} | {r['docs']:,} | {r['tokens']:,} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} |")
    idx = bench_index(int(args.tokens))
    print("\n| tokens | documents | seq | epochs | samples | build s | build + save s | load cached s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in idx:
        print(f"| {r['tokens']:,} | {r['documents']:,} | {r['seq_length']} | {r['epochs']} | {r['samples']:,} | "
              f"{r['build_s']:.2f} | {r['build_and_cache_s']:.2f} | {r['load_cached_s']:.3f} |")
    blend = bench_blend()
    print(f"\nBlending index for {blend['samples']:,} samples of {blend['datasets']} datasets: {blend['seconds']:.2f} s")
    reads = bench_reads()
    print(f"\nGPTDataset reads: {reads['samples_per_s']:,.0f} samples/s of {reads['seq_length'] + 1} tokens "
          f"({reads['tokens_per_s']:,.0f} tokens/s, one process)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "preprocess": pre, "index": idx, "blend": blend, "reads": reads}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
