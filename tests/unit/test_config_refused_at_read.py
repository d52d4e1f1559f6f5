"""Model settings neox does not implement fail when deepy.py reads the config (one line, exit 2), not on
the ranks; a directly built ModelConfig meets the same rules when the model is built."""

from __future__ import annotations

import pytest

from neox.config import ModelConfig
from neox.errors import ConfigError
from tests.unit.test_deepy import MODEL, run_deepy


@pytest.mark.parametrize("key,value,message", [
    ("use_qk_layernorm", "true", "use_qk_layernorm: query/key layernorm is not implemented; set it to false"),
    ("output_layer_parallelism", '"row"', "output_layer_parallelism: only 'column' (the output layer split by "
                                          "vocabulary) is implemented, got 'row'"),
])
def test_dry_run_refuses_in_one_line(tmp_path, key, value, message):
    conf = tmp_path / "model.yml"
    conf.write_text(MODEL)
    extra = tmp_path / "extra.yml"
    extra.write_text(f'{{"{key}": {value}}}\n')
    out = run_deepy("--dry-run", "train.py", str(conf), str(extra))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"neox: error: {extra}: {message}") and out.stderr.count("\n") == 1, out.stderr


def test_model_built_directly_meets_the_same_rules():
    from neox.model import GPTModel

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
                padded_vocab_size=128)
    with pytest.raises(ConfigError, match="use_qk_layernorm: query/key layernorm is not implemented"):
        GPTModel(ModelConfig(**base, use_qk_layernorm=True), device="meta")
    with pytest.raises(ConfigError, match="hidden_size: hidden_size 64 is not divisible by num_attention_heads 6"):
        GPTModel(ModelConfig(**{**base, "num_attention_heads": 6}), device="meta")
    with pytest.raises(ConfigError, match="attention type 'local' is not supported"):
        GPTModel(ModelConfig(**base, attention_config=["local", "local"]), device="meta")
