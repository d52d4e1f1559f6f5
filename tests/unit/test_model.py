"""GPTModel against transformers' LlamaForCausalLM and GPTNeoXForCausalLM built from the same weights."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from neox.config.model import ModelConfig
from neox.errors import ConfigError
from neox.model import GPTModel, lm_loss

V, H, NQ, NKV, FFN, L, S = 96, 64, 8, 2, 80, 2, 12


def llama_cfg(**kw) -> ModelConfig:
    base = dict(
        num_layers=L, hidden_size=H, num_attention_heads=NQ, num_kv_heads=NKV, attention_type="groupedquery",
        seq_length=32, max_position_embeddings=32, intermediate_size=FFN, padded_vocab_size=V, norm="rmsnorm",
        rms_norm_epsilon=1e-6, pos_emb="rotary", rotary_emb_base=50000.0, mlp_type="llama", activation="silu",
        use_bias_in_norms=False, use_bias_in_attn_linear=False, use_bias_in_mlp=False, no_weight_tying=True,
        hidden_dropout=0.0, attention_dropout=0.0, init_method="small_init", output_layer_init_method="wang_init",
    )
    base.update(kw)
    return ModelConfig(**base)


def neox_cfg(**kw) -> ModelConfig:
    base = dict(
        num_layers=L, hidden_size=H, num_attention_heads=4, seq_length=32, max_position_embeddings=32,
        padded_vocab_size=V, norm="layernorm", layernorm_epsilon=1e-5, pos_emb="rotary", rotary_pct=0.25,
        rotary_emb_base=10000, mlp_type="regular", activation="gelu", gpt_j_residual=True, no_weight_tying=False,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    base.update(kw)
    return ModelConfig(**base)


def _randomise(model: torch.nn.Module) -> None:
    """Norm weights start at 1 and biases at 0; perturb everything so the mapping is really tested."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def to_llama(model: GPTModel, cfg: ModelConfig) -> LlamaForCausalLM:
    hf_cfg = LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=FFN, num_hidden_layers=L, num_attention_heads=NQ,
        num_key_value_heads=NKV, rms_norm_eps=cfg.rms_norm_epsilon, rope_theta=cfg.rotary_emb_base,
        max_position_embeddings=32, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    sd, d = model.state_dict(), H // NQ
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"], "model.norm.weight": sd["final_norm.weight"],
           "lm_head.weight": sd["output_layer.weight"]}
    for i in range(L):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        qw, kw, vw = sd[p + "attention.query_key_value.weight"].split([NQ * d, NKV * d, NKV * d])
        gate, up = sd[p + "mlp.linear1.weight"].split([FFN, FFN])
        out.update({
            q + "input_layernorm.weight": sd[p + "input_norm.weight"],
            q + "post_attention_layernorm.weight": sd[p + "post_attention_norm.weight"],
            q + "self_attn.q_proj.weight": qw, q + "self_attn.k_proj.weight": kw, q + "self_attn.v_proj.weight": vw,
            q + "self_attn.o_proj.weight": sd[p + "attention.dense.weight"],
            q + "mlp.gate_proj.weight": gate, q + "mlp.up_proj.weight": up,
            q + "mlp.down_proj.weight": sd[p + "mlp.linear2.weight"],
        })
    hf.load_state_dict(out, strict=True)
    return hf


def _neox_qkv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Ours [q; k; v] (each [heads*d]) -> GPT-NeoX's per-head interleaved [head: q, k, v]."""
    d = t.shape[0] // (3 * heads)
    return t.reshape(3, heads, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def to_gptneox(model: GPTModel, cfg: ModelConfig) -> GPTNeoXForCausalLM:
    hf_cfg = GPTNeoXConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=4 * H,
        hidden_act="gelu", rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rotary_emb_base, max_position_embeddings=32,
        layer_norm_eps=cfg.layernorm_epsilon, use_parallel_residual=True, tie_word_embeddings=False, attention_bias=True,
    )
    hf = GPTNeoXForCausalLM(hf_cfg).eval()
    sd = model.state_dict()
    out = {"gpt_neox.embed_in.weight": sd["embedding.word_embeddings.weight"],
           "gpt_neox.final_layer_norm.weight": sd["final_norm.weight"], "gpt_neox.final_layer_norm.bias": sd["final_norm.bias"],
           "lm_head.weight": sd["embedding.word_embeddings.weight"]}  # tied: the head is the embedding
    for i in range(L):
        p, q = f"layers.{i}.", f"gpt_neox.layers.{i}."
        for ours, theirs in [("input_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                             ("attention.dense", "attention.dense"), ("mlp.linear1", "mlp.dense_h_to_4h"),
                             ("mlp.linear2", "mlp.dense_4h_to_h")]:
            out[q + theirs + ".weight"], out[q + theirs + ".bias"] = sd[p + ours + ".weight"], sd[p + ours + ".bias"]
        out[q + "attention.query_key_value.weight"] = _neox_qkv(sd[p + "attention.query_key_value.weight"], 4)
        out[q + "attention.query_key_value.bias"] = _neox_qkv(sd[p + "attention.query_key_value.bias"], 4)
    hf.load_state_dict(out, strict=True)
    return hf


def test_llama_logits_match_transformers():
    cfg = llama_cfg()
    model = GPTModel(cfg, seed=3).eval()
    _randomise(model)
    hf = to_llama(model, cfg)
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.shape == (2, S, V)
    assert (ours - ref).abs().max().item() < 1e-5


def test_gptneox_classic_logits_match_transformers():
    cfg = neox_cfg()
    model = GPTModel(cfg, seed=4).eval()
    _randomise(model)
    assert "output_layer.weight" not in model.state_dict()  # tied
    hf = to_gptneox(model, cfg)
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("make", [llama_cfg, neox_cfg])
def test_kv_cache_prefill_and_decode_match_full_forward(make):
    model = GPTModel(make(), seed=5).eval()
    _randomise(model)
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_kv_cache(2, 16)
        parts = [model(ids[:, :5], kv_cache=cache), model(ids[:, 5:8], kv_cache=cache)]  # prefill, then a chunk
        parts += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(8, S)]  # single-token decode
    assert cache.seen == S
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5
    with torch.no_grad():  # a prompt's forward for decoding: the last position's logits only
        last = model(ids[:, :5], kv_cache=model.allocate_kv_cache(2, 16), last_only=True)
    assert last.shape == (2, 1, full.shape[-1]) and (last - full[:, 4:5]).abs().max().item() < 1e-5


def test_activation_checkpointing_gives_identical_gradients():
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(4))
    grads = []
    for ckpt in (False, True):
        model = GPTModel(llama_cfg(checkpoint_activations=ckpt, checkpoint_num_layers=1, hidden_dropout=0.1), seed=6)
        model.train()
        torch.manual_seed(0)
        lm_loss(model(ids[:, :-1]), ids[:, 1:], torch.ones(2, S - 1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_lm_loss_matches_cross_entropy_with_mask():
    logits = torch.randn(2, 5, V)
    labels = torch.randint(0, V, (2, 5))
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
    ref = torch.nn.functional.cross_entropy(logits[mask.bool()], labels[mask.bool()])
    assert torch.allclose(lm_loss(logits, labels, mask), ref, atol=1e-6)


def test_init_methods_statistics_and_seed():
    cfg = llama_cfg(num_layers=4, hidden_size=256, num_attention_heads=8, intermediate_size=512, padded_vocab_size=512)
    a, b, c = GPTModel(cfg, seed=7), GPTModel(cfg, seed=7), GPTModel(cfg, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.layers[0].mlp.linear1.weight, c.layers[0].mlp.linear1.weight)
    small = (2 / (5 * 256)) ** 0.5
    wang = 2 / 4 / 256**0.5
    assert abs(a.layers[0].attention.query_key_value.weight.std().item() / small - 1) < 0.05
    assert abs(a.layers[1].mlp.linear2.weight.std().item() / wang - 1) < 0.05
    assert torch.equal(a.final_norm.weight, torch.ones(256))


def test_config_errors():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        GPTModel(llama_cfg(num_kv_heads=3))
    with pytest.raises(ConfigError, match="attention type"):
        GPTModel(llama_cfg(attention_config=["sparse", "global"]))
    with pytest.raises(ConfigError, match="output_layer_parallelism"):
        GPTModel(llama_cfg(output_layer_parallelism="row"))
