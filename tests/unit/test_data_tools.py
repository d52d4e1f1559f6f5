"""tools/merge_datasets.py and tools/inspect_dataset.py on spec-written datasets."""

from __future__ import annotations

import json

from tests.fixtures.data.mmap_spec import spec_read, spec_write
from tools.inspect_dataset import main as inspect_main
from tools.merge_datasets import main as merge_main


def test_merge_folder_and_list(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    spec_write(str(shards / "a"), [[1, 2], [3]], [0, 1, 2], 8)
    spec_write(str(shards / "b"), [[4, 5, 6]], [0, 1], 8)
    out = str(tmp_path / "m")
    assert merge_main(["--input", str(shards), "--output-prefix", out, "--no-progress"]) == 0
    assert "merged 2 datasets: 3 items, 3 documents, 6 tokens" in capsys.readouterr().out
    _, code, sizes, doc_idx, items = spec_read(out)
    assert code == 8 and items == [[1, 2], [3], [4, 5, 6]] and doc_idx == [0, 1, 2, 3]
    out2 = str(tmp_path / "m2")
    assert merge_main(["--input", f"{shards / 'b'},{shards / 'a'}", "--output-prefix", out2, "--no-progress"]) == 0
    assert spec_read(out2)[4] == [[4, 5, 6], [1, 2], [3]]
    spec_write(str(shards / "c"), [[7]], [0, 1], 4)  # int32: cannot join uint16 shards
    assert merge_main(["--input", str(shards), "--output-prefix", out, "--no-progress"]) == 2
    assert "different dtypes" in capsys.readouterr().err


def test_inspect_counts_and_histogram(tmp_path, capsys):
    prefix = str(tmp_path / "d")
    spec_write(prefix, [[5, 5, 7], [0], [5, 3, 3, 3]], [0, 2, 3], 4)
    assert inspect_main(["--input", prefix, "--json", "--top-k", "2", "--num-samples", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["items"], r["documents"], r["tokens"], r["distinct_tokens"], r["max_token_id"]) == (3, 2, 8, 4, 7)
    assert [(t["id"], t["count"]) for t in r["top_tokens"]] == [(3, 3), (5, 3)]  # ties: lower id first
    assert [s["text"] for s in r["samples"]] == [[5, 5, 7], [5, 3, 3, 3]]
    assert r["item_tokens"]["max"] == 4
    assert inspect_main(["--input", str(tmp_path / "none")]) == 2
