#!/usr/bin/env python
"""Summarise an indexed dataset: counts, document lengths, a token histogram, decoded samples.

    python tools/inspect_dataset.py --input datasets/quickstart/pystdlib_train_text_document \\
        --tokenizer-type SPMTokenizer --vocab-file datasets/quickstart/tokenizer.model

Without a tokenizer, token ids are shown instead of text. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox.data.indexed_dataset import MMapIndexedDataset, make_dataset  # noqa: E402
from neox.errors import NeoXError, format_error  # noqa: E402


def token_counts(ds: MMapIndexedDataset, progress: bool = True, chunk: int = 1 << 24) -> np.ndarray:
    """Occurrences of every token id over the whole ``.bin`` (read in chunks)."""
    from tqdm import tqdm

    total = int(ds.sizes.sum(dtype=np.int64))
    flat = np.memmap(ds.path + ".bin", dtype=ds.dtype, mode="r", shape=(total,)) if total else np.zeros(0, ds.dtype)
    counts = np.zeros(1, dtype=np.int64)
    with tqdm(total=total, unit="tok", unit_scale=True, disable=not progress) as bar:
        for lo in range(0, total, chunk):
            part = np.bincount(np.asarray(flat[lo:lo + chunk], dtype=np.int64))
            if len(part) > len(counts):
                part[: len(counts)] += counts
                counts = part
            else:
                counts[: len(part)] += part
            bar.update(min(chunk, total - lo))
    return counts


def describe(ds: MMapIndexedDataset, tokenizer: Any = None, top_k: int = 20, num_samples: int = 3,
             sample_tokens: int = 64, progress: bool = True) -> dict:
    """The report as a dict (JSON-able)."""
    sizes = np.asarray(ds.sizes, dtype=np.int64)
    counts = token_counts(ds, progress)
    order = np.argsort(-counts, kind="stable")[:top_k]

    def text(ids: list[int]) -> Any:
        return tokenizer.detokenize(ids) if tokenizer is not None else ids

    report = {
        "path": ds.path, "dtype": str(ds.dtype), "items": len(ds), "documents": max(len(ds.doc_idx) - 1, 0),
        "tokens": int(sizes.sum()), "distinct_tokens": int((counts > 0).sum()),
        "max_token_id": int(len(counts) - 1) if counts.any() else None,
        "item_tokens": {"min": int(sizes.min()), "mean": float(sizes.mean()), "median": float(np.median(sizes)),
                        "max": int(sizes.max())} if len(sizes) else None,
        "top_tokens": [{"id": int(i), "count": int(counts[i]), "share": float(counts[i] / max(counts.sum(), 1)),
                        "text": text([int(i)])} for i in order if counts[i] > 0],
        "samples": [{"item": int(i), "text": text(ds.get(int(i), 0, min(sample_tokens, int(sizes[i]))).tolist())}
                    for i in np.linspace(0, len(ds) - 1, num=min(num_samples, len(ds)), dtype=np.int64)],
    }
    if tokenizer is not None and report["max_token_id"] is not None and report["max_token_id"] >= tokenizer.vocab_size:
        report["warning"] = (f"token id {report['max_token_id']} is outside the tokenizer's vocabulary "
                             f"of {tokenizer.vocab_size}: wrong tokenizer for this dataset?")
    return report


def print_report(r: dict) -> None:
    print(f"{r['path']}: {r['items']:,} items, {r['documents']:,} documents, {r['tokens']:,} tokens ({r['dtype']})")
    if r["item_tokens"]:
        s = r["item_tokens"]
        print(f"tokens per item: min {s['min']:,}, median {s['median']:,.0f}, mean {s['mean']:,.1f}, max {s['max']:,}")
    print(f"distinct tokens {r['distinct_tokens']:,}, largest id {r['max_token_id']}")
    print("most frequent tokens:")
    for t in r["top_tokens"]:
        print(f"  {t['id']:>8} {t['count']:>12,} {100 * t['share']:6.2f}%  {t['text']!r}")
    for s in r["samples"]:
        print(f"--- item {s['item']} ---\n{s['text']}")
    if "warning" in r:
        print(f"warning: {r['warning']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="dataset prefix (without .bin/.idx)")
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--top-k", type=int, default=20, help="most frequent tokens to list")
    p.add_argument("--num-samples", type=int, default=3, help="items to decode")
    p.add_argument("--sample-tokens", type=int, default=64, help="tokens decoded per sample")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    try:
        tokenizer = None
        if args.tokenizer_type:
            from neox.config.data import TokenizerConfig
            from neox.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(TokenizerConfig(tokenizer_type=args.tokenizer_type,
                                                        vocab_file=args.vocab_file, merge_file=args.merge_file))
        report = describe(make_dataset(args.input), tokenizer, args.top_k, args.num_samples, args.sample_tokens,
                          progress=not args.json)
    except NeoXError as err:
        print(format_error(err), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
