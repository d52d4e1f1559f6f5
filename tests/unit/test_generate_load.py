"""``python deepy.py generate.py TRAINING.yml TEXTGEN.yml`` with ``load`` unset reads the latest checkpoint under
``save`` (checked against transformers' greedy generate of the same weights), and bad text-generation keys are a
one-line error from deepy.py before anything is launched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.distributed.launch import free_port
from tests.unit.test_convert_meta import ROOT, make_meta_checkpoint, tool
from tests.unit.test_generation_cli import assert_greedy_like_transformers

# the model of tests/unit/test_convert_meta.py's Meta checkpoint, as a training config: save, no load
TRAINING = """{
  "pipe_parallel_size": 0, "model_parallel_size": 1, "num_gpus": 1, "master_port": %(port)d,
  "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2,
  "attention_type": "groupedquery", "seq_length": 32, "max_position_embeddings": 64, "intermediate_size": 224,
  "norm": "rmsnorm", "rms_norm_epsilon": 1.0e-5, "pos_emb": "rotary", "rotary_emb_base": 500000,
  "mlp_type": "llama", "activation": "silu", "use_bias_in_norms": false, "use_bias_in_attn_linear": false,
  "use_bias_in_mlp": false, "no_weight_tying": true, "make_vocab_size_divisible_by": 128,
  "tokenizer_type": "SPMTokenizer", "vocab_file": "%(tmp)s/spm.model",
  "train_micro_batch_size_per_gpu": 1, "train_iters": 10, "save": "%(tmp)s/checkpoints",
}
"""
# GPT-NeoX's configs/text_generation.yml keys
TEXTGEN = {"text_gen_type": "input-file", "maximum_tokens": 6, "prompt_end": "\n", "temperature": 0.0,
           "top_p": 0.0, "top_k": 0, "recompute": False, "num_samples": 1}


def _spm(tmp_path) -> None:
    import sentencepiece as spm

    (tmp_path / "c.txt").write_text("\n".join(f"the number {i} is {'even' if i % 2 else 'odd'}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "spm"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)


def _configs(tmp_path, **textgen) -> list[str]:
    (tmp_path / "train.yml").write_text(TRAINING % {"port": free_port(), "tmp": tmp_path})
    values = {**TEXTGEN, "sample_input_file": str(tmp_path / "prompts.txt"),
              "sample_output_file": str(tmp_path / "out.jsonl"), **textgen}
    (tmp_path / "textgen.yml").write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
    return [str(tmp_path / "train.yml"), str(tmp_path / "textgen.yml")]


def _deepy(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "deepy.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_generate_with_load_unset_reads_the_latest_checkpoint_under_save(tmp_path):
    _spm(tmp_path)
    make_meta_checkpoint(tmp_path / "meta", 1, seed=7)
    confs = _configs(tmp_path)
    prompts = ["the number 5 is", "the number 12"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    # a checkpoint folder as training leaves it: {save}/latest naming {save}/global_step0
    assert tool("convert_raw_llama_weights_to_neox").main(
        ["--input_dir", str(tmp_path / "meta"), "--config_file", confs[0], "--output_dir", str(tmp_path / "checkpoints")]) == 0
    assert (tmp_path / "checkpoints" / "latest").is_file()

    proc = _deepy("generate.py", *confs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["context"] for r in recs] == prompts

    assert_greedy_like_transformers(recs, tmp_path, max_new_tokens=6)


BAD = [
    ({"temperature": -0.5}, "temperature: expected a number >= 0 (0: greedy), got -0.5"),
    ({"top_p": 1.5}, "top_p: expected a probability in [0, 1] (0: off), got 1.5"),
    ({"top_k": -1}, "top_k: expected an integer >= 0 (0: off), got -1"),
    ({"maximum_tokens": 0}, "maximum_tokens: expected an integer >= 1, got 0"),
    ({"num_samples": 0, "text_gen_type": "unconditional"}, "num_samples: expected an integer >= 1, got 0"),
    ({"text_gen_type": "precompute"}, "text_gen_type"),
    ({"text_gen_type": None}, "text_gen_type: generate.py needs text_gen_type"),
    ({"sample_input_file": None}, "sample_input_file: text_gen_type 'input-file' reads its prompts"),
    ({}, "prompts.txt: file not found"),  # input-file mode and no such file
    ({"maximum-tokens": "many"}, "maximum_tokens"),
]


@pytest.mark.parametrize("textgen, message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_textgen_keys_are_refused_before_launch(tmp_path, monkeypatch, textgen, message):
    import deepy
    import neox.launcher
    from neox.errors import ConfigError

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("global_step0")
    if "maximum-tokens" in textgen:
        textgen = {"maximum_tokens": None, **textgen}
    confs = _configs(tmp_path, **textgen)
    launched = []
    monkeypatch.setattr(neox.launcher, "launch", lambda *a, **k: launched.append(a) or 0)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: launched.append(a))
    with pytest.raises(ConfigError) as err:
        deepy.main(["generate.py", *confs])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert launched == []


def test_no_checkpoint_anywhere_is_one_line_from_deepy_and_a_dry_run_warning(tmp_path):
    (tmp_path / "prompts.txt").write_text("hello\n")
    confs = _configs(tmp_path)
    proc = _deepy("generate.py", *confs)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"neox: error: load: generate.py needs a checkpoint: set load, or train first so that save "
                           f"holds one; load is not set and save ({tmp_path}/checkpoints) holds none (no latest file "
                           "there)\n")
    assert not (tmp_path / "out.jsonl").exists()
    dry = _deepy("--dry-run", "generate.py", *confs)
    assert dry.returncode == 0, dry.stderr
    assert any(w.startswith("load: generate.py needs a checkpoint") for w in json.loads(dry.stdout)["warnings"])


def test_load_equal_to_an_empty_save_is_refused(tmp_path, monkeypatch):
    import deepy
    from neox.errors import ConfigError

    (tmp_path / "prompts.txt").write_text("hello\n")
    confs = _configs(tmp_path, load=str(tmp_path / "checkpoints"))
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(ConfigError, match=r"load: .*checkpoints: no checkpoint there"):
        deepy.main(["generate.py", *confs])
