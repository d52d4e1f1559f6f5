#!/usr/bin/env python
"""Tokenize documents into Megatron/NeoX ``{output_prefix}_{key}_document.bin/.idx`` files.

    python tools/preprocess_data.py --input data/ --output-prefix out/pile \\
        --tokenizer-type SPMTokenizer --vocab-file tokenizer.model --append-eod --workers 8

``--input``: jsonl, jsonl.zst, parquet, a folder of those, a comma-separated list, or a folder a
Hugging Face ``datasets`` ``save_to_disk`` wrote. Flags follow GPT-NeoX's tools/datasets/preprocess_data.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox.config.data import TokenizerConfig  # noqa: E402
from neox.data.preprocess import preprocess, summary  # noqa: E402
from neox.errors import NeoXError, format_error  # noqa: E402
from neox.tokenizer import build_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="file, folder, comma-separated list, or HF save_to_disk folder")
    g.add_argument("--jsonl-keys", nargs="+", default=["text"], help="keys (columns) to tokenize, one output each")
    g.add_argument("--num-docs", type=int, default=None, help="accepted for NeoX compatibility; unused")
    g.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="a malformed document stops the run (fail) or is skipped and counted (skip)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True,
                   choices=["SPMTokenizer", "HFTokenizer", "HFGPT2Tokenizer", "GPT2BPETokenizer", "CharLevelTokenizer"])
    g.add_argument("--vocab-file", default=None, help="tokenizer.model / tokenizer.json / vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    g.add_argument("--ftfy", action="store_true", help="fix text with ftfy first (needs the ftfy package)")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"])
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between throughput updates")
    g.add_argument("--batch-size", type=int, default=64, help="documents per task sent to a worker")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tokenizer = build_tokenizer(TokenizerConfig(
            tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file))
        stats = preprocess(args.input, args.output_prefix, tokenizer, keys=tuple(args.jsonl_keys),
                           append_eod=args.append_eod, workers=args.workers, on_error=args.on_error,
                           batch_size=args.batch_size, log_interval=args.log_interval, ftfy=args.ftfy,
                           progress=not args.no_progress)
    except NeoXError as err:
        if os.environ.get("NEOX_DEBUG") == "1":
            raise
        print(format_error(err), file=sys.stderr)
        return 2
    for err in stats.errors:
        print(f"skipped: {err}", file=sys.stderr)
    print(summary(stats))
    for out in stats.outputs:
        print(f"wrote {out}.bin and {out}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
