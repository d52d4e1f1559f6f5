"""Preprocessing: every input format, 2 workers == 1 process byte for byte, == direct tokenization."""

from __future__ import annotations

import json
import os

import pytest

from neox.data.preprocess import preprocess
from neox.errors import DataError
from neox.tokenizer.sentencepiece import SPMTokenizer
from tests.fixtures.data.mmap_spec import spec_read
from tests.fixtures.data.tokenizers import corpus, train_spm

DOCS = [f"doc {i}: " + " ".join(corpus(i % 9 + 1)) + ("\n\tnaïve ☃" if i % 5 == 0 else "") for i in range(150)]
DOCS[7] = ""  # an empty document is left out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return SPMTokenizer(train_spm(str(tmp_path_factory.mktemp("spm"))))


def write_jsonl(path, docs, extra=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "title": f"t{i}"} | (extra or {})) + "\n")


def write_zst(path, docs):
    import zstandard

    raw = "".join(json.dumps({"text": d, "title": f"t{i}"}) + "\n" for i, d in enumerate(docs)).encode()
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(raw))


def write_parquet(path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "title": [f"t{i}" for i in range(len(docs))]}), path, row_group_size=40)


def expected(tok, docs):
    return [tok.tokenize(d) + [tok.eod] for d in docs if d]


def run(tmp_path, inputs, tok, name, **kw):
    prefix = str(tmp_path / name)
    stats = preprocess(inputs, prefix, tok, append_eod=True, progress=False, batch_size=16, **kw)
    return prefix + "_text_document", stats


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "parquet"])
def test_two_workers_equal_one_and_direct_tokenization(tmp_path, tok, fmt):
    path = str(tmp_path / f"in.{fmt}")
    {"jsonl": write_jsonl, "jsonl.zst": write_zst, "parquet": write_parquet}[fmt](path, DOCS)
    one, stats = run(tmp_path, path, tok, "one", workers=1)
    two, stats2 = run(tmp_path, path, tok, "two", workers=2)
    for ext in (".bin", ".idx"):
        assert open(one + ext, "rb").read() == open(two + ext, "rb").read()
    version, code, sizes, doc_idx, items = spec_read(one)
    assert code == 8  # uint16 for a vocabulary under 65500
    assert items == expected(tok, DOCS)
    assert doc_idx == list(range(len(items) + 1))
    assert stats.docs == stats2.docs == 149 and stats.empty == 1
    assert stats.tokens == sum(sizes)


def test_folder_list_and_hf_dataset(tmp_path, tok):
    import datasets

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(str(folder / "a.jsonl"), DOCS[:50])
    write_zst(str(folder / "sub" / "b.jsonl.zst"), DOCS[50:100])
    (folder / "notes.md").write_text("ignored")
    extra = str(tmp_path / "c.parquet")
    write_parquet(extra, DOCS[100:])
    prefix, stats = run(tmp_path, f"{folder},{extra}", tok, "mixed", workers=2)
    assert spec_read(prefix)[4] == expected(tok, DOCS)
    hf_dir = str(tmp_path / "hf")
    datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(hf_dir)
    prefix, stats = run(tmp_path, hf_dir, tok, "hf", workers=1)
    assert spec_read(prefix)[4] == expected(tok, DOCS)


def test_several_keys(tmp_path, tok):
    path = str(tmp_path / "in.jsonl")
    write_jsonl(path, DOCS[:20])
    stats = preprocess(path, str(tmp_path / "k"), tok, keys=("text", "title"), progress=False)
    assert sorted(os.path.basename(p) for p in stats.outputs) == ["k_text_document", "k_title_document"]
    assert spec_read(str(tmp_path / "k_title_document"))[4] == [tok.tokenize(f"t{i}") for i in range(20)]


def test_malformed_lines_fail_or_skip_with_file_and_line(tmp_path, tok):
    path = str(tmp_path / "bad.jsonl")
    lines = [json.dumps({"text": "good one"}), json.dumps({"text": "good two"}), "{not json",
             json.dumps({"body": "no text key"}), json.dumps({"text": 5}), json.dumps(["a list"]),
             json.dumps({"text": "good three"})]
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff utf8"}\n')
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
            run(tmp_path, path, tok, f"fail{workers}", workers=workers)
        assert not [f for f in os.listdir(tmp_path) if f.startswith(f"fail{workers}")]
        prefix, stats = run(tmp_path, path, tok, f"skip{workers}", workers=workers, on_error="skip")
        assert stats.skipped == 5 and stats.docs == 3
        assert [e.split(": ", 1)[0].rsplit(":", 1)[1] for e in stats.errors] == ["3", "4", "5", "6", "8"]
        assert "missing key 'text'" in stats.errors[1] and "invalid UTF-8" in stats.errors[4]
        assert spec_read(prefix)[4] == expected(tok, ["good one", "good two", "good three"])


def test_wide_vocab_uses_int32_and_cli(tmp_path, tok, capsys):
    class Wide:
        vocab_size, eod = 70_000, 69_999

        def tokenize(self, text):
            return [69_000 + len(w) for w in text.split()]

    path = str(tmp_path / "in.jsonl")
    write_jsonl(path, ["a bb ccc", "dddd"])
    prefix, _ = run(tmp_path, path, Wide(), "wide")
    _, code, _, _, items = spec_read(prefix)
    assert code == 4 and items == [[69_001, 69_002, 69_003, 69_999], [69_004, 69_999]]

    from tools.preprocess_data import main

    out = str(tmp_path / "cli")
    assert main(["--input", path, "--output-prefix", out, "--tokenizer-type", "SPMTokenizer", "--vocab-file",
                 tok.model_file, "--append-eod", "--workers", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "processed 2 documents" in printed and "tokens/s" in printed
    assert spec_read(out + "_text_document")[4] == expected(tok, ["a bb ccc", "dddd"])
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", out, "--tokenizer-type",
                 "CharLevelTokenizer"]) == 2
    assert "neox: error: --input" in capsys.readouterr().err
