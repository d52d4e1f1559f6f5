"""tools/check_upstream_configs.py over the GPT-NeoX configs kept in tests/fixtures/neox_configs, and the upstream
configs it found refused wrongly, each with a YAML written with those upstream keys."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from neox.config import NeoXArgs
from neox.errors import ConfigError
from tests.unit.test_convert_meta import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "neox_configs"
REFUSED = ROOT / "tests" / "fixtures" / "neox_configs_refused"  # upstream files neox refuses, rightly


def _tool():
    spec = importlib.util.spec_from_file_location("check_upstream_configs", ROOT / "tools" / "check_upstream_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_sweep_of_the_fixture_configs(capsys):
    tool = _tool()
    assert tool.main(["--configs", str(FIXTURES), "--json"]) == 0  # nothing refused wrongly
    records = {r["file"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["llama_train_config.yml"]["with"] == ["llama_7B.yml"]  # an overlay after its model config
    assert records["text_generation.yml"] == {"file": "text_generation.yml", "with": ["125M.yml"],
                                              "outcome": "resolves", "feature": None, "message": ""}
    assert {r["outcome"] for r in records.values()} == {"resolves"}
    assert tool.main(["--configs", str(REFUSED), "--base", str(FIXTURES / "125M.yml"), "--json"]) == 0
    records = {r["file"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["prof.yml"]["with"] == [str(FIXTURES / "125M.yml")]
    refused = {name: r["feature"] for name, r in records.items() if r["outcome"] == "refused rightly"}
    assert refused == {"125M-dmoe.yml": "mixture of experts", "bnb_125M.yml": "bitsandbytes optimizer",
                       "local_setup_comet.yml": "Comet logging", "mamba_130M.yml": "Mamba",
                       "prof.yml": "memory profiling", "rwkv_170M.yml": "RWKV", "sparse.yml": "sparse attention"}


def test_a_traceback_or_an_unexplained_refusal_is_refused_wrongly():
    tool = _tool()
    assert tool.verdict("refused", "/x/a.yml: hidden_size: hidden_size 2048 is not divisible by ...")[0] == "refused wrongly"
    assert tool.verdict("crashed", "KeyError: 'x'")[0] == "refused wrongly"
    assert tool.verdict("refused", "/x/mamba.yml: attention_config: attention type 'mamba' is not supported") == (
        "refused rightly", "Mamba")


# GPT-NeoX's configs/mamba/*.yml: heads that do not divide hidden ("ignored when using mamba") and the Mamba init
MAMBA = {"num_layers": 2, "hidden_size": 2048, "num_attention_heads": 12, "seq_length": 64,
         "max_position_embeddings": 64, "attention_config": [[["mamba"], 2]], "init_method": "small_init",
         "output_layer_init_method": "single_residual_scaled_normal", "tokenizer_type": "CharLevelTokenizer",
         "train_micro_batch_size_per_gpu": 1, "num_gpus": 1}


def test_a_mamba_config_is_refused_for_mamba_not_for_its_other_keys(tmp_path):
    (tmp_path / "mamba.yml").write_text(json.dumps(MAMBA))
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_ymls([str(tmp_path / "mamba.yml")], world_size=1)
    assert str(err.value) == (f"{tmp_path}/mamba.yml: attention_config: attention type 'mamba' is not supported "
                              "(expected one of ('global', 'flash'))")


def test_single_residual_scaled_normal_is_gpt_neox_init(tmp_path):
    from neox.model.init import init_method

    conf = {**MAMBA, "hidden_size": 64, "num_attention_heads": 4, "num_layers": 16,
            "attention_config": [[["global"], 16]], "init_method_std": 0.02}
    (tmp_path / "model.yml").write_text(json.dumps(conf))
    m = NeoXArgs.from_ymls([str(tmp_path / "model.yml")], world_size=1).model
    assert m.output_layer_init_method == "single_residual_scaled_normal"
    fn = init_method(m.output_layer_init_method, std=m.init_method_std, num_layers=m.num_layers, hidden_size=m.hidden_size)
    t = torch.empty(512, 512)
    fn(t, torch.Generator().manual_seed(0))
    # GPT-NeoX: scaled_init_method_normal(sigma, num_layers, num_residuals_per_layer=1) = N(0, sigma / sqrt(L))
    assert t.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.01) and abs(t.mean().item()) < 1e-3
