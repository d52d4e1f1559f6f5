"""The committed quickstart corpus is intact and decodes to the sources it lists; the builder runs offline."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig

import numpy as np
import pytest

from neox.data.indexed_dataset import MMapIndexedDataset
from neox.tokenizer.sentencepiece import SPMTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QS = os.path.join(ROOT, "datasets", "quickstart")


def test_committed_artifacts_match_manifest_and_sources():
    manifest = json.load(open(os.path.join(QS, "manifest.json")))
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256(open(os.path.join(QS, name), "rb").read()).hexdigest() == digest, name
    tok = SPMTokenizer(os.path.join(QS, "tokenizer.model"))
    assert tok.vocab_size == manifest["vocab_size"] and tok.eod == 2
    for split in ("train", "valid"):
        ds = MMapIndexedDataset(os.path.join(QS, f"pystdlib_{split}_text_document"))
        assert ds.dtype == np.uint16
        assert len(ds) == manifest["counts"][split]["documents"] == len(manifest["files"][split])
        assert int(ds.sizes.sum()) == manifest["counts"][split]["tokens"]
        last = ds[len(ds) - 1]
        assert int(last[-1]) == tok.eod
    if platform.python_version() != manifest["python"]:
        pytest.skip("another Python version: its standard library differs from the committed corpus")
    ds = MMapIndexedDataset(os.path.join(QS, "pystdlib_valid_text_document"))
    for i in (0, len(ds) - 1):
        rel = manifest["files"]["valid"][i]
        source = open(os.path.join(sysconfig.get_paths()["stdlib"], rel), encoding="utf-8").read()
        assert tok.detokenize(ds[i][:-1].tolist()) == source


def test_builder_runs_offline_on_a_small_budget(tmp_path, capsys):
    from tools.build_quickstart_data import main

    out = str(tmp_path / "qs")
    assert main(["--output-dir", out, "--max-chars", "150000", "--vocab-size", "400", "--valid-every", "4",
                 "--workers", "1"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["counts"]["valid"]["documents"] >= 1 and manifest["counts"]["train"]["tokens"] > 10_000
    assert not set(manifest["files"]["train"]) & set(manifest["files"]["valid"])
    assert all("test" not in f.split(os.sep)[:-1] for f in manifest["files"]["train"])
    ds = MMapIndexedDataset(os.path.join(out, "pystdlib_train_text_document"))
    assert int(ds.sizes.sum()) == manifest["counts"]["train"]["tokens"]


def test_rebuild_is_byte_identical(tmp_path):
    import sentencepiece

    from tools.build_quickstart_data import build

    manifest = json.load(open(os.path.join(QS, "manifest.json")))
    same = (platform.python_version() == manifest["python"] and sentencepiece.__version__ == manifest["sentencepiece"]
            and os.path.isdir(manifest["source_root"]))
    if not same:
        pytest.skip("another Python / sentencepiece: the corpus is rebuilt differently")
    rebuilt = build(str(tmp_path), manifest["source_root"], manifest["max_chars"], manifest["vocab_size"],
                    manifest["valid_every"], workers=2)
    assert rebuilt["sha256"] == manifest["sha256"]
