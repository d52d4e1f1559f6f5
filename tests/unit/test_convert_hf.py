"""transformers folders (Llama with GQA, GPTNeoX) -> neox at TP 2 -> logits and the HF export round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_core.tensor_parallel.utils import shard, unshard
from neox.convert import weights
from neox.errors import ConfigError
from neox.generation import load_weights
from neox.model.layout import full_shapes, model_layout
from tests.unit.test_convert_meta import VOCAB, model_cfg, tool


def neox_cfg_for_gpt_neox(**over):
    base = dict(norm="layernorm", use_bias_in_norms=True, layernorm_epsilon=1e-5, rotary_pct=0.25,
                rotary_emb_base=10000.0, mlp_type="regular", activation="gelu", gpt_j_residual=True,
                use_bias_in_attn_linear=True, use_bias_in_mlp=True, num_kv_heads=None,
                attention_type="multihead", intermediate_size=256)
    base.update(over)
    return model_cfg(**base)


def hf_llama(folder, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=tie)
    model = LlamaForCausalLM(conf).eval()
    with torch.no_grad():  # transformers zero-inits nothing we rely on, but make norms non-trivial
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


def hf_gpt_neox(folder):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(1)
    conf = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25, rotary_emb_base=10000,
                         layer_norm_eps=1e-5, use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False,
                         attention_bias=True)
    model = GPTNeoXForCausalLM(conf).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bias" in n or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


def neox_logits(ckpt, cfg, ids):
    from neox.model import GPTModel

    model = GPTModel(cfg).eval()
    load_weights(model, str(ckpt), cfg)
    with torch.no_grad():
        return model(ids)[..., :VOCAB]


@pytest.mark.parametrize("family", ["llama", "llama_tied", "gpt_neox"])
def test_hf_to_neox_tp2_and_back(tmp_path, family):
    from transformers import AutoModelForCausalLM

    to_neox, to_hf = tool("convert_hf_to_neox"), tool("convert_neox_to_hf")
    tied = family == "llama_tied"
    ref = hf_gpt_neox(tmp_path / "hf") if family == "gpt_neox" else hf_llama(tmp_path / "hf", tie=tied)
    cfg = neox_cfg_for_gpt_neox() if family == "gpt_neox" else model_cfg(no_weight_tying=not tied)
    tag = to_neox.convert(tmp_path / "hf", cfg, tmp_path / "ckpt", 2, progress=False)
    assert len(list(tag.glob("mp_rank_*_model_states.pt"))) == 2
    cfg = dataclasses.replace(cfg, padded_vocab_size=2 * VOCAB)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    assert (neox_logits(tmp_path / "ckpt", cfg, ids) - want).abs().max().item() < 1e-5

    to_hf.convert(tmp_path / "ckpt", cfg, tmp_path / "out", vocab_size=VOCAB)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back) is type(ref)
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    for name, t in ref_sd.items():
        if "rotary" not in name:
            assert torch.equal(back_sd[name], t), name
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)


def test_hf_config_disagreements_are_named(tmp_path):
    hf_llama(tmp_path / "hf")
    with pytest.raises(ConfigError) as e:
        tool("convert_hf_to_neox").convert(tmp_path / "hf", model_cfg(num_layers=3, rotary_emb_base=10000.0),
                                           tmp_path / "ckpt", 1, progress=False)
    assert "num_layers" in str(e.value) and "rotary_emb_base" in str(e.value) and "config.json" in str(e.value)


def test_bf16_export_and_tokenizer_files(tmp_path):
    import sentencepiece as spm

    hf_llama(tmp_path / "hf")
    tool("convert_hf_to_neox").convert(tmp_path / "hf", model_cfg(), tmp_path / "ckpt", 1, progress=False)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the number {i} is {'even' if i % 2 == 0 else 'odd'}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "spm"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)

    @dataclasses.dataclass
    class Tok:
        tokenizer_type: str = "SPMTokenizer"
        vocab_file: str = str(tmp_path / "spm.model")

    cfg = dataclasses.replace(model_cfg(), padded_vocab_size=VOCAB)
    out = tool("convert_neox_to_hf").convert(tmp_path / "ckpt", cfg, tmp_path / "out", precision="bf16",
                                              vocab_size=VOCAB, tokenizer=Tok())
    conf = json.loads((out / "config.json").read_text())
    assert conf["torch_dtype"] == "bfloat16" and (out / "tokenizer.model").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert h.get_tensor("lm_head.weight").dtype == torch.bfloat16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    assert tok("the number 12 is even", add_special_tokens=False)["input_ids"] == ref.encode("the number 12 is even")


@pytest.mark.parametrize("gated", [True, False])
def test_full_layout_is_tp_independent(gated):
    # Shards against the model's own: tests/unit/test_layout.py.
    over = {} if gated else {"mlp_type": "regular", "activation": "gelu", "use_bias_in_mlp": True,
                             "use_bias_in_attn_linear": True, "norm": "layernorm", "use_bias_in_norms": True}
    cfg = dataclasses.replace(model_cfg(**over), padded_vocab_size=VOCAB)
    g = torch.Generator().manual_seed(0)
    layout = model_layout(cfg)
    full = {n: torch.randn(*s, generator=g) for n, s in full_shapes(layout).items()}
    for tp in (1, 2):
        for name, t in full.items():
            split = layout[name].split
            shards = [shard(t, split, r, tp) for r in range(tp)]
            assert [weights.shard_for_rank(name, t, split, tp, r).shape for r in range(tp)] == [s.shape for s in shards]
            assert torch.equal(unshard(shards, split), t), (name, tp)
            for r in range(tp):
                assert torch.equal(weights.shard_for_rank(name, t, split, tp, r), shards[r]), (name, tp, r)
