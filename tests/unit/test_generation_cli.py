"""The command lines end to end: Meta -> neox (TP 2) -> ``python deepy.py generate.py`` on 2 CPU ranks,
checked against transformers' greedy generate; the HF export through its CLI loads in transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tests.distributed.launch import free_port
from tests.unit.test_convert_meta import ROOT, make_meta_checkpoint, reference_llama, tool

CONF = """{
  "pipe_parallel_size": 0, "model_parallel_size": 2, "num_gpus": 2, "master_port": %(port)d,
  "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2,
  "attention_type": "groupedquery", "seq_length": 32, "max_position_embeddings": 64, "intermediate_size": 224,
  "norm": "rmsnorm", "rms_norm_epsilon": 1.0e-5, "pos_emb": "rotary", "rotary_emb_base": 500000,
  "mlp_type": "llama", "activation": "silu", "use_bias_in_norms": false, "use_bias_in_attn_linear": false,
  "use_bias_in_mlp": false, "no_weight_tying": true, "make_vocab_size_divisible_by": 64,
  "tokenizer_type": "SPMTokenizer", "vocab_file": "%(tmp)s/spm.model", "load": "%(tmp)s/ckpt",
  "train_micro_batch_size_per_gpu": 1,
  "text_gen_type": "input-file", "sample_input_file": "%(tmp)s/prompts.txt",
  "sample_output_file": "%(tmp)s/out.jsonl", "maximum_tokens": 8, "temperature": 0.0,
}
"""


def test_meta_to_deepy_generate_tp2_matches_transformers(tmp_path):
    import sentencepiece as spm

    make_meta_checkpoint(tmp_path / "meta", 2, seed=4)
    (tmp_path / "c.txt").write_text("\n".join(f"the number {i} is {'even' if i % 2 else 'odd'}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "spm"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    conf = tmp_path / "conf.yml"
    conf.write_text(CONF % {"port": free_port(), "tmp": tmp_path})
    prompts = ["the number 3 is", "the number 42"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert tool("convert_raw_llama_weights_to_neox").main(
        ["--input_dir", str(tmp_path / "meta"), "--config_file", str(conf), "--output_dir", str(tmp_path / "ckpt")]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "deepy.py", "generate.py", str(conf)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["context"] for r in recs] == prompts

    tok, ref = assert_greedy_like_transformers(recs, tmp_path, max_new_tokens=8)

    hf = tmp_path / "hf"
    assert tool("convert_neox_to_hf").main(["--input_dir", str(tmp_path / "ckpt"), "--config_file", str(conf),
                                            "--output_dir", str(hf), "--precision", "fp32"]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    assert model.config.vocab_size == tok.vocab_size  # padding rows dropped at export
    ids = torch.tensor([tok.tokenize(prompts[0])])
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits[..., : tok.vocab_size]).abs().max().item() < 1e-5
    assert (hf / "tokenizer.model").is_file()


def assert_greedy_like_transformers(recs: list[dict], tmp_path, *, max_new_tokens: int):
    """Each generate.py record's text is transformers' greedy continuation of its context (the reference
    Llama of tmp_path/meta, the SentencePiece model tmp_path/spm.model); returns (tokenizer, reference)."""
    from neox.tokenizer.build import build_tokenizer

    class Tok:
        tokenizer_type, vocab_file, merge_file = "SPMTokenizer", str(tmp_path / "spm.model"), None

    tok = build_tokenizer(Tok())
    ref = reference_llama(tmp_path / "meta")
    for rec in recs:
        ids = tok.tokenize(rec["context"])
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=tok.eod, pad_token_id=tok.eod,  # generate.py never picks padding rows
                               suppress_tokens=list(range(tok.vocab_size, 128)))
        new = out[0, len(ids):].tolist()
        assert rec["text"] == tok.detokenize(new[: new.index(tok.eod)] if tok.eod in new else new)
    return tok, ref
