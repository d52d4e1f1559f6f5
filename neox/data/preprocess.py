"""Tokenize jsonl / jsonl.zst / parquet / Hugging Face ``save_to_disk`` folders into indexed datasets.

The engine behind ``tools/preprocess_data.py``. Records are read in the main process (raw lines,
undecoded) and tokenized in a pool that returns batches in order, so the output with N workers is
byte-identical to a single-process run.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neox.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_dtype
from neox.errors import DataError

SUFFIXES = (".jsonl", ".jsonl.zst", ".json", ".parquet")


@dataclass(frozen=True)
class Record:
    """One input document: where it came from (file, 1-based line or row) and its undecoded payload."""

    source: str
    line: int
    payload: bytes | dict


@dataclass
class PreprocessStats:
    docs: int = 0
    tokens: int = 0
    chars: int = 0
    skipped: int = 0
    empty: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _is_hf_dataset_dir(path: str) -> bool:
    names = set(os.listdir(path))
    return "dataset_dict.json" in names or ("dataset_info.json" in names and "state.json" in names)


def expand_inputs(spec: str | Iterable[str]) -> list[str]:
    """Comma list / folders → the ordered list of input files (or HF dataset folders)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in filter(None, items):
        if os.path.isdir(item):
            if _is_hf_dataset_dir(item):
                out.append(item)
                continue
            found = []
            for root, dirs, files in os.walk(item):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files) if f.endswith(SUFFIXES)]
            if not found:
                raise DataError(f"--input {item}: folder holds no {', '.join(SUFFIXES)} files")
            out += found
        elif os.path.isfile(item):
            if not item.endswith(SUFFIXES):
                raise DataError(f"--input {item}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
            out.append(item)
        else:
            raise DataError(f"--input {item}: no such file or folder")
    return out


def _iter_lines(path: str) -> Iterator[Record]:
    with open(path, "rb") as raw:
        stream: Any = raw
        if path.endswith(".zst"):
            import zstandard

            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20)
        for n, line in enumerate(stream, 1):
            if line.strip():
                yield Record(path, n, line)


def _iter_parquet(path: str, keys: list[str]) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    missing = [k for k in keys if k not in pf.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: parquet file has no column {missing[0]!r}; columns are {pf.schema_arrow.names}")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=keys):
        for rec in batch.to_pylist():
            row += 1
            yield Record(path, row, rec)


def _iter_hf(path: str, keys: list[str]) -> Iterator[Record]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: Hugging Face DatasetDict has no 'train' split; splits are {list(ds)}")
        ds = ds["train"]
    missing = [k for k in keys if k not in ds.column_names]
    if missing:
        raise DataError(f"{path}: dataset has no column {missing[0]!r}; columns are {ds.column_names}")
    row = 0
    for batch in ds.select_columns(keys).iter(batch_size=1024):
        for i in range(len(batch[keys[0]])):
            row += 1
            yield Record(path, row, {k: batch[k][i] for k in keys})


def iter_records(paths: list[str], keys: list[str]) -> Iterator[Record]:
    """Every document of ``paths`` in order."""
    for path in paths:
        if os.path.isdir(path):
            yield from _iter_hf(path, keys)
        elif path.endswith(".parquet"):
            yield from _iter_parquet(path, keys)
        else:
            yield from _iter_lines(path)


class Encoder:
    """Turns records into token arrays per key, or an error message naming file:line."""

    def __init__(self, tokenizer: Any, keys: list[str], append_eod: bool, dtype: Any, ftfy: bool = False) -> None:
        self.tokenizer, self.keys, self.append_eod = tokenizer, keys, append_eod
        self.dtype = np.dtype(dtype)
        self.ftfy = ftfy

    def texts(self, rec: Record) -> dict[str, str]:
        obj = rec.payload
        if isinstance(obj, bytes):
            try:
                obj = json.loads(obj)
            except UnicodeDecodeError as err:
                raise ValueError(f"invalid UTF-8 ({err.reason} at byte {err.start})") from None
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        out = {}
        for key in self.keys:
            if key not in obj:
                raise ValueError(f"missing key {key!r}")
            if not isinstance(obj[key], str):
                raise ValueError(f"key {key!r} is {type(obj[key]).__name__}, expected a string")
            out[key] = obj[key]
        return out

    def encode(self, rec: Record) -> tuple[dict[str, np.ndarray] | None, int, str | None]:
        """(token arrays per key, characters, None) or (None, 0, "file:line: message")."""
        try:
            texts = self.texts(rec)
        except ValueError as err:
            return None, 0, f"{rec.source}:{rec.line}: {err}"
        ids, chars = {}, 0
        for key, text in texts.items():
            if self.ftfy:
                import ftfy

                text = ftfy.fix_text(text)
            tokens = self.tokenizer.tokenize(text) if text else []
            if tokens and self.append_eod:
                tokens.append(self.tokenizer.eod)
            ids[key] = np.asarray(tokens, dtype=self.dtype)
            chars += len(text)
        return ids, chars, None

    def encode_batch(self, batch: list[Record]) -> list[tuple[dict[str, np.ndarray] | None, int, str | None]]:
        return [self.encode(rec) for rec in batch]


# Pool workers build their own Encoder once (tokenizers are not cheap to pickle per task);
# this name is only ever assigned inside worker processes.
_worker_encoder: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _worker_encode(batch: list[Record]) -> list:
    assert _worker_encoder is not None
    return _worker_encoder.encode_batch(batch)


def _payload_bytes(rec: Record) -> int:
    if isinstance(rec.payload, bytes):
        return len(rec.payload)
    return sum(len(v) for v in rec.payload.values() if isinstance(v, str))


def _batches(records: Iterator[Record], size: int, max_bytes: int = 1 << 18) -> Iterator[list[Record]]:
    """Groups of at most ``size`` records or ~``max_bytes`` of text: enough tasks to keep every
    worker busy when documents are long, few enough to keep per-task overhead small."""
    batch: list[Record] = []
    nbytes = 0
    for rec in records:
        batch.append(rec)
        nbytes += _payload_bytes(rec)
        if len(batch) == size or nbytes >= max_bytes:
            yield batch
            batch, nbytes = [], 0
    if batch:
        yield batch


def output_prefix(prefix: str, key: str) -> str:
    """NeoX's naming: ``{prefix}_{key}_document``."""
    return f"{prefix}_{key}_document"


def preprocess(inputs: str | list[str], prefix: str, tokenizer: Any, *, keys: tuple[str, ...] = ("text",),
               append_eod: bool = False, workers: int = 1, on_error: str = "fail", batch_size: int = 64,
               log_interval: int = 1000, ftfy: bool = False, progress: bool = True) -> PreprocessStats:
    """Tokenize every document of ``inputs`` into ``{prefix}_{key}_document.bin/.idx``."""
    if on_error not in ("fail", "skip"):
        raise DataError(f"--on-error {on_error!r}: expected 'fail' or 'skip'")
    paths = expand_inputs(inputs)
    keys = list(keys)
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    encoder = Encoder(tokenizer, keys, append_eod, dtype, ftfy)
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    builders = {k: MMapIndexedDatasetBuilder(output_prefix(prefix, k) + ".bin", dtype=dtype) for k in keys}
    stats = PreprocessStats()
    start = time.perf_counter()
    batches = _batches(iter_records(paths, keys), batch_size)
    if workers > 1:
        # Forked workers must not share the Rust tokenizers thread pool of the parent.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pool = mp.get_context("fork" if os.name != "nt" else "spawn").Pool(
        workers, initializer=_init_worker, initargs=(encoder,)) if workers > 1 else None
    try:
        results = pool.imap(_worker_encode, batches, chunksize=1) if pool else map(encoder.encode_batch, batches)
        _consume(results, builders, stats, on_error, log_interval, progress, start)
    except BaseException:
        for b in builders.values():
            b.discard()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for key, b in builders.items():
        b.finalize(output_prefix(prefix, key) + ".idx")
        stats.outputs.append(output_prefix(prefix, key))
    stats.seconds = time.perf_counter() - start
    return stats


def _consume(results: Iterable[list], builders: dict[str, MMapIndexedDatasetBuilder], stats: PreprocessStats,
             on_error: str, log_interval: int, progress: bool, start: float) -> None:
    from tqdm import tqdm

    bar = tqdm(unit="doc", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    next_log = log_interval
    try:
        for batch in results:
            for ids, chars, err in batch:
                if err is not None:
                    if on_error == "fail":
                        raise DataError(f"{err} (pass --on-error skip to skip malformed documents)")
                    stats.skipped += 1
                    if len(stats.errors) < 20:
                        stats.errors.append(err)
                    continue
                _write_doc(ids, builders, stats)
                stats.chars += chars
            bar.update(len(batch))
            if stats.docs + stats.skipped + stats.empty >= next_log:
                next_log += log_interval
                dt = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{stats.docs / dt:,.0f} docs/s, {stats.tokens / dt:,.0f} tokens/s", refresh=False)
    finally:
        bar.close()


def _write_doc(ids: dict[str, np.ndarray], builders: dict[str, MMapIndexedDatasetBuilder],
               stats: PreprocessStats) -> None:
    if all(len(t) == 0 for t in ids.values()):
        stats.empty += 1
        return
    for key, tokens in ids.items():
        # One item per document (NeoX layout); an empty field adds nothing for that key.
        if len(tokens):
            builders[key].add_item(tokens)
            builders[key].end_document()
            stats.tokens += len(tokens)
    stats.docs += 1


def summary(stats: PreprocessStats) -> str:
    """The final line a preprocessing run prints."""
    dt = max(stats.seconds, 1e-9)
    line = (f"processed {stats.docs:,} documents, {stats.tokens:,} tokens, {stats.chars:,} characters in "
            f"{stats.seconds:.1f} s ({stats.docs / dt:,.0f} docs/s, {stats.tokens / dt:,.0f} tokens/s)")
    if stats.empty:
        line += f"; {stats.empty:,} empty documents left out"
    if stats.skipped:
        line += f"; {stats.skipped:,} malformed documents skipped"
    return line
