#!/usr/bin/env python
"""Build the offline quickstart corpus from the Python standard library's own sources.

    python tools/build_quickstart_data.py [--output-dir datasets/quickstart] [--max-chars 5500000]

Every machine with Python has the corpus: the .py files (code, comments, docstrings) of the running
interpreter's standard library (PSF licence). Steps: pick files (test suites, encodings tables,
build-specific files left out) in a fixed pseudo-random order up to ``--max-chars``, hold out every
``--valid-every``-th file for validation, train a SentencePiece tokenizer on the training files
(tools/train_tokenizer.py), and tokenize both splits with EOD appended (tools/preprocess_data.py).

Outputs in ``--output-dir``: ``tokenizer.model``, ``pystdlib_train_text_document.{bin,idx}``,
``pystdlib_valid_text_document.{bin,idx}`` and ``manifest.json`` (what was used, counts, checksums).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox.data.preprocess import preprocess, summary  # noqa: E402
from neox.tokenizer.sentencepiece import SPMTokenizer  # noqa: E402

# Test suites (huge, odd encodings), generated code tables and build-specific files.
EXCLUDE_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__",
                "lib-dynload", "ensurepip", "lib2to3"}
EXCLUDE_PREFIXES = ("_sysconfigdata", "config-")
MAX_FILE_CHARS = 300_000


def stdlib_files(root: str) -> list[str]:
    """Relative paths of the usable .py files under ``root``, in a fixed order (crc32 of the path)."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDE_DIRS and not d.startswith(EXCLUDE_PREFIXES))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith(EXCLUDE_PREFIXES):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found, key=lambda p: (zlib.crc32(p.encode()), p))


def write_splits(root: str, files: list[str], max_chars: int, valid_every: int, tmp: str) -> dict:
    """Write train/valid jsonl files; returns what went where."""
    taken: dict[str, list[str]] = {"train": [], "valid": []}
    chars = 0
    with open(os.path.join(tmp, "train.jsonl"), "w") as tr, open(os.path.join(tmp, "valid.jsonl"), "w") as va:
        for rel in files:
            try:
                with open(os.path.join(root, rel), encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip() or len(text) > MAX_FILE_CHARS:
                continue
            split = "valid" if (len(taken["train"]) + len(taken["valid"])) % valid_every == valid_every - 1 else "train"
            (va if split == "valid" else tr).write(json.dumps({"text": text, "meta": {"path": rel}}) + "\n")
            taken[split].append(rel)
            chars += len(text)
            if chars >= max_chars:
                break
    return {"files": taken, "chars": chars}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _spm_version() -> str:
    import sentencepiece

    return sentencepiece.__version__


def build(out_dir: str, source_root: str, max_chars: int, vocab_size: int, valid_every: int, workers: int) -> dict:
    from tools.train_tokenizer import train

    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        picked = write_splits(source_root, stdlib_files(source_root), max_chars, valid_every, tmp)
        print(f"corpus: {len(picked['files']['train'])} train + {len(picked['files']['valid'])} valid files, "
              f"{picked['chars']:,} characters from {source_root}")
        model = train(os.path.join(tmp, "train.jsonl"), os.path.join(tmp, "tokenizer"), vocab_size,
                      num_threads=workers)
        shutil.copyfile(model, os.path.join(out_dir, "tokenizer.model"))
        tok = SPMTokenizer(os.path.join(out_dir, "tokenizer.model"))
        print(f"tokenizer: {tok.vocab_size} pieces, eod={tok.eod} ({time.perf_counter() - start:.1f} s)")
        counts = {}
        for split in ("train", "valid"):
            stats = preprocess(os.path.join(tmp, f"{split}.jsonl"), os.path.join(out_dir, f"pystdlib_{split}"), tok,
                               append_eod=True, workers=workers)
            print(f"{split}: {summary(stats)}")
            counts[split] = {"documents": stats.docs, "tokens": stats.tokens, "characters": stats.chars}
    outputs = sorted(f for f in os.listdir(out_dir) if f.endswith((".bin", ".idx", ".model")))
    manifest = {
        "source": "Python standard library .py files (PSF License)",
        "python": platform.python_version(), "sentencepiece": _spm_version(), "source_root": source_root,
        "max_chars": max_chars,
        "vocab_size": vocab_size, "valid_every": valid_every, "counts": counts,
        "files": picked["files"], "sha256": {f: _sha256(os.path.join(out_dir, f)) for f in outputs},
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"done in {time.perf_counter() - start:.1f} s: {', '.join(outputs)} in {out_dir}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="datasets/quickstart")
    p.add_argument("--source-root", default=sysconfig.get_paths()["stdlib"], help="folder of .py files")
    p.add_argument("--max-chars", type=int, default=5_500_000, help="characters of source to use")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--valid-every", type=int, default=20, help="every N-th file goes to validation")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    build(args.output_dir, args.source_root, args.max_chars, args.vocab_size, args.valid_every, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
