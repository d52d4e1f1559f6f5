"""Mutated variants of the real configs in configs/: each is a one-line ConfigError naming the key.

The mutations are generated from the shipped configs (wrong types, missing required keys, impossible
parallel sizes, unknown enum values, typos, unreadable files). Most resolve in-process through
``NeoXArgs.from_ymls`` (milliseconds each); a handful run the real ``python deepy.py`` to check the
exit code 2, the single stderr line and that nothing was written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from neox.config import NeoXArgs
from neox.config.keys import canonical
from neox.config.loader import read_yaml
from neox.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BASES = ("quickstart", "125M", "1B", "tinyllama_1b", "llemma_7b")

Mutation = Callable[[dict[str, Any]], dict[str, Any]]


def _set(**kv: Any) -> Mutation:
    return lambda c: {**c, **kv}


def _drop(*names: str) -> Mutation:
    return lambda c: {k: v for k, v in c.items() if k not in names}


def _heads_not_divisible(c: dict[str, Any]) -> dict[str, Any]:
    heads = c["num_attention_heads"]
    bad = next(m for m in (3, 5, 7, 9, 11) if heads % m)
    return {**c, "model_parallel_size": bad, "num_gpus": bad}


def _more_stages_than_layers(c: dict[str, Any]) -> dict[str, Any]:
    stages = c["num_layers"] + 1
    return {**c, "pipe_parallel_size": stages, "num_gpus": stages * c.get("model_parallel_size", 1)}


def _world_not_divisible(c: dict[str, Any]) -> dict[str, Any]:
    # two ranks per model replica, three ranks started
    return {**c, "model_parallel_size": 2, "pipe_parallel_size": 0, "num_gpus": 3}


def _batch_triple_inconsistent(c: dict[str, Any]) -> dict[str, Any]:
    return {**c, "train_batch_size": 7, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}


# (id, mutation, key the message must name)
MUTATIONS: list[tuple[str, Mutation, str]] = [
    # wrong types
    ("num_layers_str", _set(num_layers="twelve"), "num_layers"),
    ("hidden_size_list", _set(hidden_size=[768]), "hidden_size"),
    ("heads_float", _set(num_attention_heads=12.5), "num_attention_heads"),
    ("seq_length_str", _set(seq_length="2k"), "seq_length"),
    ("micro_batch_str", _set(train_micro_batch_size_per_gpu="8"), "train_micro_batch_size_per_gpu"),
    ("train_iters_dict", _set(train_iters={"n": 10}), "train_iters"),
    ("no_weight_tying_str", _set(no_weight_tying="yes"), "no_weight_tying"),
    ("use_bias_int", _set(use_bias_in_mlp=0), "use_bias_in_mlp"),
    ("rotary_pct_str", _set(rotary_pct="full"), "rotary_pct"),
    ("zero_optimization_str", _set(zero_optimization="stage1"), "zero_optimization"),
    ("optimizer_str", _set(optimizer="adam"), "optimizer"),
    ("seed_str", _set(seed="abc"), "seed"),
    ("train_data_paths_int", _set(train_data_paths=5), "train_data_paths"),
    ("attention_config_str", _set(attention_config="flash"), "attention_config"),
    # missing required keys
    ("missing_num_layers", _drop("num_layers"), "num_layers"),
    ("missing_hidden_size", _drop("hidden_size"), "hidden_size"),
    ("missing_heads", _drop("num_attention_heads"), "num_attention_heads"),
    ("missing_seq_length", _drop("seq_length", "max_position_embeddings"), "seq_length"),
    # impossible sizes
    ("negative_layers", _set(num_layers=-3), "num_layers"),
    ("zero_hidden", _set(hidden_size=0), "hidden_size"),
    ("hidden_not_divisible", lambda c: {**c, "hidden_size": c["hidden_size"] + 1}, "hidden_size"),
    ("kv_heads_not_divisor", lambda c: {**c, "num_kv_heads": c["num_attention_heads"] + 1}, "num_kv_heads"),
    ("model_parallel_zero", _set(model_parallel_size=0), "model_parallel_size"),
    ("pipe_parallel_negative", _set(pipe_parallel_size=-1), "pipe_parallel_size"),
    ("heads_not_divisible_by_mp", _heads_not_divisible, "num_attention_heads"),
    ("more_stages_than_layers", _more_stages_than_layers, "pipe_parallel_size"),
    ("world_not_divisible", _world_not_divisible, "model_parallel_size"),
    ("batch_triple", _batch_triple_inconsistent, "train_batch_size"),
    ("zero_micro_batch", _set(train_micro_batch_size_per_gpu=0), "train_micro_batch_size_per_gpu"),
    ("dropout_one", _set(hidden_dropout=1.0), "hidden_dropout"),
    ("zero_stage_7", _set(zero_optimization={"stage": 7}), "zero_optimization"),
    ("log_interval_zero", _set(log_interval=0), "log_interval"),
    # the right type, outside the meaning
    ("lr_negative", _set(lr=-1.0), "lr"),
    ("min_lr_above_lr", _set(min_lr=1.0), "min_lr"),
    ("warmup_above_one", _set(warmup=2.0), "warmup"),
    ("weight_decay_negative", _set(weight_decay=-0.1), "weight_decay"),
    ("clipping_negative", _set(gradient_clipping=-1.0), "gradient_clipping"),
    ("rotary_base_zero", _set(pos_emb="rotary", rotary_emb_base=0), "rotary_emb_base"),
    ("rms_epsilon_negative", _set(rms_norm_epsilon=-1e-5), "rms_norm_epsilon"),
    ("init_std_negative", _set(init_method_std=-0.02), "init_method_std"),
    ("max_nan_negative", _set(max_nan_iterations=-1), "max_nan_iterations"),
    ("master_port_range", _set(master_port=99999), "master_port"),
    ("s3_path_http", _set(s3_path="http://bucket/run"), "s3_path"),
    ("s3_chunk_tiny", _set(s3_chunk_size=10), "s3_chunk_size"),
    ("checkpoint_scale_exp", _set(checkpoint_scale="exp"), "checkpoint_scale"),
    ("split_words", _set(split="train,valid,test"), "split"),
    ("split_zero", _set(split="0,0,0"), "split"),
    # unknown enum values
    ("norm_batchnorm", _set(norm="batchnorm"), "norm"),
    ("pos_emb_alibi", _set(pos_emb="alibi"), "pos_emb"),
    ("activation_mish", _set(activation="mish"), "activation"),
    ("lr_decay_wavy", _set(lr_decay_style="wavy"), "lr_decay_style"),
    ("tokenizer_magic", _set(tokenizer_type="MagicTokenizer"), "tokenizer_type"),
    ("data_impl_typo", _set(data_impl="mmapp"), "data_impl"),
    ("launcher_torchrun", _set(launcher="torchrun"), "launcher"),
    ("attention_local", lambda c: {**c, "attention_config": [[["local"], c["num_layers"]]]}, "attention_config"),
    ("precision_fp8", _set(precision="fp8"), "precision"),
    ("both_half_precisions", _set(fp16={"enabled": True}, bf16={"enabled": True}), "fp16"),
    # typos and unsupported features
    ("typo_num_layer", lambda c: {**_drop("num_layers")(c), "num_layer": c["num_layers"]}, "num_layer"),
    ("typo_zero_key", _set(zero_optimization={"stage": 1, "overlap_com": True}), "zero_optimization"),
    ("moe_experts", _set(moe_num_experts=8), "moe_num_experts"),
    ("weights_count", _set(train_data_paths=["a", "b"], train_data_weights=[1.0]), "train_data_weights"),
]


def _base(name: str) -> dict[str, Any]:
    return {canonical(k): v for k, v in read_yaml(ROOT / "configs" / f"{name}.yml").items()}


def _world(conf: dict[str, Any]) -> int:
    if isinstance(conf.get("num_gpus"), int) and conf["num_gpus"] > 0:
        return conf["num_gpus"]
    mp = conf.get("model_parallel_size", 1)
    pp = conf.get("pipe_parallel_size", 0)
    return max(mp if isinstance(mp, int) else 1, 1) * max(pp if isinstance(pp, int) else 1, 1)


CASES = [(base, mid, fn, key) for base in BASES for mid, fn, key in MUTATIONS]


def test_the_real_configs_resolve():
    for base in BASES:
        conf = _base(base)
        NeoXArgs.from_ymls([str(ROOT / "configs" / f"{base}.yml")], world_size=_world(conf))
    assert len(CASES) >= 100


@pytest.mark.parametrize("base,mid,mutate,key", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_mutated_config_is_a_one_line_error(tmp_path, base, mid, mutate, key):
    conf = mutate(_base(base))
    path = tmp_path / f"{base}_{mid}.yml"
    path.write_text(json.dumps(conf))
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_ymls([str(path)], world_size=_world(conf))
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    assert key in msg, msg
    assert os.listdir(tmp_path) == [path.name]  # resolving writes nothing


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        NeoXArgs.from_ymls([str(tmp_path / "missing.yml")])
    bad = tmp_path / "bad.yml"
    bad.write_text('{"num_layers": 2,, "hidden_size": }')
    with pytest.raises(ConfigError, match=r"bad.yml: line \d+: invalid YAML"):
        NeoXArgs.from_ymls([str(bad)])
    top = tmp_path / "list.yml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        NeoXArgs.from_ymls([str(top)])
    with pytest.raises(ConfigError, match="cannot read config file"):
        NeoXArgs.from_ymls(["quickstart.yml"], conf_dir=str(tmp_path / "nowhere"))


# ---- the real entry point ------------------------------------------------------------------


def _deepy(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "deepy.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


SUBPROCESS_CASES = [
    ("quickstart", "hidden_not_divisible", "hidden_size"),
    ("125M", "pos_emb_alibi", "pos_emb"),
    ("llemma_7b", "heads_not_divisible_by_mp", "num_attention_heads"),
]


def _write_mutation(tmp_path: Path, base: str, mid: str) -> Path:
    fn = next(m[1] for m in MUTATIONS if m[0] == mid)
    conf = fn(_base(base))
    path = tmp_path / "conf" / f"{base}_{mid}.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(conf))
    return path


def test_deepy_exit_2_one_line_nothing_written(tmp_path):
    """Dry runs and real launches alike: exit 2, one stderr line, empty stdout, no file written."""
    work = tmp_path / "work"
    work.mkdir()
    for i, (base, mid, key) in enumerate(SUBPROCESS_CASES):
        path = _write_mutation(tmp_path, base, mid)
        argv = ["--dry-run"] if i % 2 == 0 else []  # the launch path must refuse before starting anything
        out = _deepy(work, *argv, str(ROOT / "train.py"), str(path))
        assert out.returncode == 2, (base, mid, out.stderr[-2000:])
        assert out.stdout == ""
        assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"neox: error: {path}: "), out.stderr
        assert key in out.stderr
        assert list(work.iterdir()) == []


# ---- paths that don't exist -------------------------------------------------------------------
# A dry run resolves configs whose files live on the cluster (a login node may not see them), so
# missing inputs are refused by a real local launch, before any rank starts, and by every rank
# before it builds anything.

QUICKSTART_INPUTS = {  # key -> (value, given the test's tmp_path; what the error says)
    "train_data_paths": (lambda t: ["datasets/quickstart/no_such_text_document"], "not found"),
    "valid_data_paths": (lambda t: ["/nonexistent/valid_text_document"], "not found"),
    "vocab_file": (lambda t: "datasets/quickstart/no_such_tokenizer.model", "not found"),
    "load": (lambda t: "/nonexistent/checkpoints", "no such checkpoint directory"),
    "save": (lambda t: str(t / "conf.yml" / "checkpoints"), "is a file, not a directory"),
}


@pytest.mark.parametrize("key", sorted(QUICKSTART_INPUTS))
def test_missing_input_paths_are_refused_at_launch(tmp_path, key):
    value, needle = QUICKSTART_INPUTS[key]
    conf = {**_base("quickstart"), "save": str(tmp_path / "save"), "log_dir": str(tmp_path / "logs"),
            "tensorboard_dir": str(tmp_path / "tb"), key: value(tmp_path)}
    path = tmp_path / "conf.yml"
    path.write_text(json.dumps(conf))
    work = tmp_path / "work"
    work.mkdir()
    # the launch runs from the checkout so the config's relative paths resolve as a user's would
    out = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(path)], cwd=ROOT,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"neox: error: {key}: "), out.stderr
    assert needle in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf.yml", "work"]


def test_load_equal_to_save_may_not_exist_yet(tmp_path, monkeypatch):
    """The resume-after-preemption setup (load: == save:) starts fresh on the first run."""
    from neox.config.validate import input_files_exist

    monkeypatch.chdir(ROOT)
    save = str(tmp_path / "run" / "checkpoints")
    input_files_exist(NeoXArgs.from_flat({**_base("quickstart"), "save": save, "load": save}, world_size=1))
    assert list(tmp_path.iterdir()) == []


def test_missing_data_is_refused_on_the_rank_before_anything_is_built(tmp_path, monkeypatch):
    from neox.training.pretrain import pretrain

    monkeypatch.chdir(ROOT)
    conf = {**_base("quickstart"), "train_data_paths": ["/nonexistent/x_text_document"],
            "save": str(tmp_path / "save"), "log_dir": str(tmp_path / "logs")}
    args = NeoXArgs.from_flat(conf, world_size=1)  # what the rank rebuilds from the launcher's config
    with pytest.raises(ConfigError, match=r"^train_data_paths: /nonexistent/x_text_document.bin: dataset file not found"):
        pretrain(args)
    assert list(tmp_path.iterdir()) == []
