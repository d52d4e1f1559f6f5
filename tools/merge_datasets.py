#!/usr/bin/env python
"""Concatenate indexed datasets of one dtype into one ``.bin/.idx`` pair.

    python tools/merge_datasets.py --input shards/ --output-prefix merged/pile_text_document
    python tools/merge_datasets.py --input a_text_document,b_text_document --output-prefix ab_text_document

``--input``: a folder (every ``*.idx`` in it, sorted by name) or comma-separated dataset prefixes.
Documents keep their order; the document index is merged too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder, make_dataset  # noqa: E402
from neox.errors import DataError, NeoXError, format_error  # noqa: E402


def input_prefixes(spec: str) -> list[str]:
    """Dataset prefixes named by a folder or a comma-separated list."""
    if os.path.isdir(spec):
        prefixes = sorted(os.path.join(spec, f[:-4]) for f in os.listdir(spec) if f.endswith(".idx"))
        if not prefixes:
            raise DataError(f"--input {spec}: folder holds no .idx files")
        return prefixes
    return [p.strip() for p in spec.split(",") if p.strip()]


def merge(prefixes: list[str], output_prefix: str, progress: bool = True) -> MMapIndexedDataset:
    """Write the concatenation of ``prefixes`` to ``output_prefix`` and open it."""
    from tqdm import tqdm

    datasets = [make_dataset(p) for p in prefixes]  # validates every input before writing anything
    dtypes = {str(d.dtype) for d in datasets}
    if len(dtypes) > 1:
        raise DataError(f"--input: datasets have different dtypes {sorted(dtypes)}; re-run preprocessing with one tokenizer")
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise DataError(f"--output-prefix {output_prefix}: is one of the inputs")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builder = MMapIndexedDatasetBuilder(output_prefix + ".bin", dtype=datasets[0].dtype)
    for p in tqdm(prefixes, unit="dataset", disable=not progress):
        builder.merge_file_(p)
    builder.finalize(output_prefix + ".idx")
    return MMapIndexedDataset(output_prefix)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of .bin/.idx pairs, or comma-separated prefixes")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}.bin and {prefix}.idx")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        prefixes = input_prefixes(args.input)
        out = merge(prefixes, args.output_prefix, progress=not args.no_progress)
    except NeoXError as err:
        print(format_error(err), file=sys.stderr)
        return 2
    dt = time.perf_counter() - start
    tokens = int(out.sizes.sum(dtype="int64"))
    size = os.path.getsize(args.output_prefix + ".bin")
    print(f"merged {len(prefixes)} datasets: {len(out):,} items, {len(out.doc_idx) - 1:,} documents, {tokens:,} tokens "
          f"in {dt:.1f} s ({size / max(dt, 1e-9) / 2**20:,.0f} MiB/s) -> {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
