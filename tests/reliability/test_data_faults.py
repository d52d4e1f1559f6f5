"""Bad data reaches training as one-line DataError/ConfigError naming the file (and the document).

Datasets are written straight from the format description (tests/fixtures/data/mmap_spec.py), then
damaged, and opened through ``build_data_iterators``, the path training uses. The byte-level
corruptions of one file are covered field by field in tests/unit/test_indexed_dataset.py; here each
class of damage is checked end to end, including from a DataLoader worker process.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from neox.config.data import DataConfig
from neox.data.builder import build_data_iterators
from neox.errors import ConfigError, DataError
from tests.fixtures.data.mmap_spec import spec_write

VOCAB = 128


def _corpus(prefix: str, docs: int = 12, length: int = 40, high: int = VOCAB, bad_doc: int | None = None) -> str:
    rng = np.random.RandomState(0)
    items = [rng.randint(0, high, size=length) for _ in range(docs)]
    if bad_doc is not None:
        items[bad_doc][7] = VOCAB + 3  # one id past the vocabulary
    spec_write(prefix, items, list(range(docs + 1)), 8)  # uint16, one item per document
    return prefix


def _iters(cfg: DataConfig, vocab_size: int | None = VOCAB):
    return build_data_iterators(cfg, seq_length=16, seed=1, micro_batch_size=2, global_batch_size=2, dp_rank=0,
                                dp_size=1, train_iters=20, eval_interval=10, eval_iters=1, vocab_size=vocab_size)


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def _damage(prefix: str, how: str) -> None:
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    if how == "bin_truncated":
        os.truncate(bin_, os.path.getsize(bin_) - 10)
    elif how == "bin_empty":
        os.truncate(bin_, 0)
    elif how == "idx_truncated":
        os.truncate(idx, os.path.getsize(idx) - 8)
    elif how == "idx_empty":
        os.truncate(idx, 0)
    elif how == "idx_garbage":
        with open(idx, "r+b") as f:
            f.write(os.urandom(64))
    elif how == "idx_huge_count":  # a bit flip in the item count
        with open(idx, "r+b") as f:
            f.seek(18)
            f.write(struct.pack("<Q", 1 << 40))
    elif how == "bin_missing":
        os.remove(bin_)
    elif how == "idx_missing":
        os.remove(idx)


DAMAGE = [
    ("bin_truncated", "data file is"),
    ("bin_empty", "data file is 0 bytes"),
    ("idx_truncated", "truncated index"),
    ("idx_empty", "truncated index"),
    ("idx_garbage", "magic"),
    ("idx_huge_count", "truncated index"),
    ("bin_missing", "dataset not found"),
    ("idx_missing", "dataset not found"),
]


@pytest.mark.parametrize("how,needle", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_dataset_is_a_one_line_error_naming_the_file(tmp_path, how, needle):
    good = _corpus(str(tmp_path / "good"))
    bad = _corpus(str(tmp_path / "bad"))
    _damage(bad, how)
    cfg = DataConfig(train_data_paths=[good, bad], valid_data_paths=[good], num_workers=0)
    with pytest.raises(DataError) as err:
        _iters(cfg)
    _one_line(err, needle, bad)


@pytest.mark.parametrize("workers", [0, 1])
def test_token_id_outside_vocabulary_names_file_and_document(tmp_path, workers):
    prefix = _corpus(str(tmp_path / "oov"), bad_doc=5)
    it = _iters(DataConfig(train_data_paths=[prefix], num_workers=workers))
    with pytest.raises(DataError) as err:
        for _ in range(20):  # one epoch: every document is read
            next(it.train)
    _one_line(err, f"{prefix}.bin: document 5 holds token id {VOCAB + 3}", f"[0, {VOCAB})")


def test_in_range_ids_pass_and_no_vocab_means_no_check(tmp_path):
    prefix = _corpus(str(tmp_path / "ok"))
    it = _iters(DataConfig(train_data_paths=[prefix], num_workers=0))
    assert all(int(next(it.train)["text"].max()) < VOCAB for _ in range(20))
    oov = _corpus(str(tmp_path / "oov"), bad_doc=0)
    it = _iters(DataConfig(train_data_paths=[oov], num_workers=0), vocab_size=None)
    assert max(int(next(it.train)["text"].max()) for _ in range(20)) == VOCAB + 3


def test_empty_datasets(tmp_path):
    empty = str(tmp_path / "empty")
    spec_write(empty, [], [0], 8)  # no documents at all
    with pytest.raises(DataError) as err:
        _iters(DataConfig(train_data_paths=[empty], num_workers=0))
    _one_line(err, empty, "no documents")
    blank = str(tmp_path / "blank")
    spec_write(blank, [[], [], []], [0, 1, 2, 3], 8)  # documents without tokens
    with pytest.raises(DataError) as err:
        _iters(DataConfig(train_data_paths=[blank], num_workers=0))
    _one_line(err, "0 tokens")
    one = _corpus(str(tmp_path / "one"), docs=1)
    with pytest.raises(ConfigError) as err:  # a split that leaves training nothing
        _iters(DataConfig(data_path=one, split="0,100,0", num_workers=0))
    _one_line(err, "split", one)


def test_weights_whose_count_differs_from_paths(tmp_path):
    a, b = _corpus(str(tmp_path / "a")), _corpus(str(tmp_path / "b"))
    with pytest.raises(ConfigError) as err:
        _iters(DataConfig(train_data_paths=[a, b], train_data_weights=[1.0], num_workers=0))
    _one_line(err, "train_data_weights", "1 weights for 2 datasets")
    from neox.config import NeoXArgs

    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 16,
            "train_micro_batch_size_per_gpu": 2}
    with pytest.raises(ConfigError) as err:  # and at config time, before any rank starts
        NeoXArgs.from_flat({**base, "valid_data_paths": [a, b], "valid_data_weights": [1, 2, 3]},
                           sources={"valid_data_weights": "mix.yml"}, world_size=1)
    _one_line(err, "mix.yml: valid_data_weights: 3 weights for 2 valid_data_paths")


def test_corrupt_index_cache_is_named(tmp_path):
    prefix = _corpus(str(tmp_path / "c"))
    _iters(DataConfig(train_data_paths=[prefix], num_workers=0))
    caches = sorted(p for p in os.listdir(tmp_path) if p.endswith("_idx.npy"))
    assert caches
    with open(tmp_path / caches[0], "wb") as f:
        f.write(b"not numpy")
    with pytest.raises(DataError) as err:
        _iters(DataConfig(train_data_paths=[prefix], num_workers=0))
    _one_line(err, "unreadable index cache", "delete these files")


@pytest.mark.parametrize("kind,content,needle", [
    ("SPMTokenizer", b"garbage", "not a SentencePiece model"),
    ("HFTokenizer", b"{not json", "not a Hugging Face tokenizer.json"),
])
def test_corrupt_tokenizer_file(tmp_path, kind, content, needle):
    from neox.config.data import TokenizerConfig
    from neox.tokenizer.build import build_tokenizer

    path = tmp_path / "tok.bin"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        build_tokenizer(TokenizerConfig(tokenizer_type=kind, vocab_file=str(path)))
    _one_line(err, str(path), needle)
