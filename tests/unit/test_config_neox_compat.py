"""GPT-NeoX's own config files resolve unchanged, and every file in configs/ resolves in a dry run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import deepy
from neox.config import NeoXArgs

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "neox_configs"


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def resolve(*names, world_size=None):
    return NeoXArgs.from_ymls(list(names), conf_dir=str(FIXTURES), world_size=world_size)


def test_neox_125M_with_local_setup():
    a = resolve("125M.yml", "local_setup.yml", world_size=8)
    # NeoX: pipe 1 x model 1 over 8 GPUs -> dp 8; micro 4, accumulation 1
    assert a.parallel.data_parallel_size == 8 and a.training.train_batch_size == 32
    assert (a.model.num_layers, a.model.hidden_size, a.model.intermediate_size) == (12, 768, 3072)
    assert a.model.attention_config == ["global"] * 12 and a.model.pos_emb == "rotary"
    assert a.precision.precision == "fp16" and a.lr.lr == 0.0006 and a.lr.warmup_iters == 3200
    assert a.data.data_path == "/workspace/enron/enron_text_document"
    assert a.checkpoint.checkpoint_factor == 10000 and a.logging.tensorboard_dir == "tensorboard"
    assert a.compat["synchronize_each_layer"] is True and a.compat["distributed_backend"] == "nccl"


def test_neox_1_3B_and_20B():
    a = resolve("1-3B.yml", world_size=4)
    assert a.model.intermediate_size == 8192 and a.deepspeed_config()["fp16"]["enabled"] is True
    b = resolve("20B.yml", world_size=96)  # as trained: 96 GPUs, pp 4 x mp 2 -> dp 12
    assert b.parallel.data_parallel_size == 12 and b.training.train_batch_size == 4 * 32 * 12
    assert b.model.gpt_j_residual and b.model.rotary_pct == 0.25 and b.checkpoint.checkpoint_factor == 500
    assert b.lr.lr == pytest.approx(0.97e-4)


def test_pythia_160M():
    a = resolve("pythia_160M.yml", world_size=32)
    assert a.training.train_batch_size == 1024  # Pythia's 1024 x 2048-token batches on 32 GPUs
    assert a.model.attention_config == ["flash"] * 12 and a.checkpoint.extra_save_iters[:3] == [0, 1, 2]
    assert a.tokenizer.tokenizer_type == "HFTokenizer"


def test_llama_configs_both_mlp_spellings():
    old = resolve("llama_7B.yml", "llama_train_config.yml", "local_setup.yml", world_size=8)
    new = resolve("llama2_7B.yml", "llama_train_config.yml", world_size=8)
    for a in (old, new):  # LLaMA-7B's MLP: 11008 per branch, SiLU gate
        assert (a.model.mlp_type, a.model.activation, a.model.intermediate_size) == ("llama", "silu", 11008)
        assert a.model.norm == "rmsnorm" and not a.model.use_bias_in_norms and a.model.padded_vocab_size is None
    assert new.model.seq_length == 4096 and new.model.rms_norm_epsilon == 1e-5


def config_sets() -> list[list[str]]:
    """Every file in configs/; files without a model are paired with a model config."""
    files = sorted((ROOT / "configs").glob("*.yml"))
    sets = []
    for f in files:
        has_model = re.search(r'"num[-_]layers"', f.read_text()) is not None
        sets.append([str(f)] if has_model else [str(ROOT / "configs" / "llemma_7b.yml"), str(f)])
    return sets


@pytest.mark.parametrize("paths", config_sets(), ids=lambda p: Path(p[-1]).name)
def test_every_repo_config_resolves_in_a_dry_run(paths, capsys):
    assert deepy.main(["--dry-run", "train.py", *paths]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["args"]["num_layers"] > 0 and report["deepspeed_config"]["train_batch_size"] > 0


def test_llemma_published_values(capsys):
    deepy.main(["--dry-run", "train.py", str(ROOT / "configs/llemma_7b.yml"), str(ROOT / "configs/data_mixture.yml")])
    r = json.loads(capsys.readouterr().out)
    a, ds = r["args"], r["deepspeed_config"]
    assert (a["model_parallel_size"], a["num_layers"], a["hidden_size"], a["num_attention_heads"]) == (2, 32, 4096, 32)
    assert (a["rotary_emb_base"], a["seq_length"], a["train_micro_batch_size_per_gpu"]) == (10000, 4096, 4)
    assert a["gradient_accumulation_steps"] == 2 and a["lr"] == 1e-4 and a["lr_decay_iters"] == 48000
    assert a["min_lr"] == pytest.approx(0.033 * 1e-4) and a["warmup_iters"] == 500
    assert a["train_data_weights"] == [2, 4, 1, 0.147368, 0.221053] and len(a["valid_data_paths"]) == 3
    assert a["zero_optimization"]["stage"] == 1 and a["bf16"] == {"enabled": True}
    assert a["data_types"] == {"grad_accum_dtype": "fp32"} and a["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert "optimizer" not in ds  # neox builds the optimizer (training/optim.py) and hands DeepSpeed the object
    # at tensor parallel 2 on 2 GPUs (data parallel 1) neox's fp32-master optimizer replaces DeepSpeed's bf16 one
    assert (ds["bf16"] == {"enabled": False}) == (a["data_parallel_size"] == 1)
    assert r["launch_command"][0] == "srun"
    big = NeoXArgs.from_ymls([str(ROOT / "configs/llemma_34b.yml")], world_size=64)
    assert (big.parallel.model_parallel_size, big.model.num_layers, big.model.hidden_size) == (8, 48, 8192)
    assert (big.model.num_attention_heads, big.model.num_kv_heads, big.model.rotary_emb_base) == (64, 8, 1e6)
    assert (big.training.train_micro_batch_size_per_gpu, big.training.gradient_accumulation_steps) == (2, 16)
    assert big.lr.lr == 5e-5 and big.training.train_iters == 12000


def fixture_sets() -> list[list[str]]:
    sets = []
    for f in sorted(FIXTURES.glob("*.yml")):
        has_model = re.search(r'"num[-_]layers"', f.read_text()) is not None
        partner = "llama_7B.yml" if f.name.startswith("llama_") else "125M.yml"  # NeoX pairs them this way
        sets.append([f.name] if has_model else [partner, f.name])
    return sets


@pytest.mark.parametrize("names", fixture_sets(), ids=lambda n: n[-1])
def test_every_neox_fixture_resolves(names, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    args = resolve(*names)  # world size planned on this machine, as deepy.py would
    ds = DeepSpeedConfig(args.deepspeed_config())  # DeepSpeed's own parser accepts what we derived
    assert ds.train_batch_size == args.training.train_batch_size


def test_gqa_and_sliding_window_configs():
    m = resolve("mistral_7B.yml").model
    assert (m.num_kv_heads, m.intermediate_size, m.sliding_window_width, m.attention_type) == (8, 14336, 4096, "groupedquery")
    big = resolve("llama2_70B.yml").model
    assert (big.num_kv_heads, big.intermediate_size, big.rotary_emb_base) == (8, 28672, 1e6)  # Llama-2-70B's FFN
    assert resolve("19M.yml").deepspeed_config()["comms_logger"]["enabled"] is True
