"""Reading and merging NeoX YAML files: braces, comments, trailing commas, dashes, duplicates."""

from __future__ import annotations

import pytest

from neox.config import NeoXArgs
from neox.config.loader import merge_files, read_yaml
from neox.errors import ConfigError

MODEL = """# a NeoX model file
{
  "num-layers": 2,   # dashed key
  "hidden_size": 64,
  "num_attention_heads": 4,
  "seq-length": 32,
  "optimizer": {"type": "Adam", "params": {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1.0e-8,},},
  "train_micro_batch_size_per_gpu": 2,
  "zero_optimization": {"stage": 1, "overlap_comm": True,},
}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_neox_style_yaml_reads_like_json(tmp_path):
    data = read_yaml(write(tmp_path, "m.yml", MODEL))
    # expected values written by hand from the file above
    assert data["num-layers"] == 2
    assert data["optimizer"] == {"type": "Adam", "params": {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8}}
    assert isinstance(data["optimizer"]["params"]["lr"], float)  # 6e-4 without a dot is a float, not a string
    assert data["zero_optimization"] == {"stage": 1, "overlap_comm": True}


def test_files_merge_left_to_right_with_sources(tmp_path):
    a = write(tmp_path, "a.yml", MODEL)
    b = write(tmp_path, "b.yml", '{"vocab-file": "v.json", "num_layers": 2, "train-iters": 10}')
    merged, sources = merge_files([a, b])
    assert merged["vocab_file"] == "v.json" and merged["train_iters"] == 10
    assert merged["num_layers"] == 2  # same value in both files is fine
    assert sources["num_layers"] == a and sources["vocab_file"] == b
    args = NeoXArgs.from_ymls([a, b], world_size=1)
    assert args.tokenizer.vocab_file == "v.json" and args.model.num_layers == 2


def test_conflicting_key_names_both_files(tmp_path):
    a = write(tmp_path, "a.yml", MODEL)
    b = write(tmp_path, "b.yml", '{"num_layers": 4}')
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_ymls([a, b], world_size=1)
    msg = str(err.value)
    assert msg.startswith(f"{b}: num_layers:") and a in msg


def test_alias_and_canonical_in_two_files_conflict(tmp_path):
    a = write(tmp_path, "a.yml", '{"save-interval": 100}')
    b = write(tmp_path, "b.yml", '{"checkpoint_factor": 200}')
    with pytest.raises(ConfigError, match="checkpoint_factor"):
        merge_files([a, b])


def test_duplicate_in_one_file_with_different_values(tmp_path):
    path = write(tmp_path, "d.yml", '{"num_layers": 2, "num_layers": 3}')
    with pytest.raises(ConfigError, match=r"d\.yml: num_layers: set twice"):
        read_yaml(path)


def test_conf_dir_and_overwrite_values(tmp_path):
    write(tmp_path, "m.yml", MODEL)
    args = NeoXArgs.from_ymls(["m.yml"], {"train_iters": 7, "seq-length": 16}, conf_dir=str(tmp_path), world_size=1)
    assert args.training.train_iters == 7 and args.model.seq_length == 16


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        NeoXArgs.from_ymls([str(tmp_path / "nope.yml")], world_size=1)
    bad = write(tmp_path, "bad.yml", '{"num_layers": 2,, }\n')
    with pytest.raises(ConfigError, match=r"bad\.yml: line 1: invalid YAML"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="expected a mapping"):
        read_yaml(write(tmp_path, "list.yml", "[1, 2]"))
