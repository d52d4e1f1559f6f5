"""Sliding-window attention (GPT-NeoX's sliding_window_width) against transformers' Mistral and a
hand-written banded softmax."""

import math

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from neox.model import GPTModel
from neox.model.attention import _sdpa
from tests.unit.test_model import FFN, NKV, NQ, H, L, S, V, _randomise, llama_cfg, to_llama


def _reference(q, k, v, window):
    """q [b, nq, s, d], k/v [b, nkv, t, d]: query i (position t - s + i) sees keys j with 0 <= pos - j <= window."""
    b, nq, s, d = q.shape
    t = k.shape[2]
    k, v = k.repeat_interleave(nq // k.shape[1], 1), v.repeat_interleave(nq // v.shape[1], 1)
    out = torch.empty_like(q)
    for i in range(s):
        pos = t - s + i
        lo = max(0, pos - window)
        scores = q[:, :, i:i + 1] @ k[:, :, lo:pos + 1].transpose(-1, -2) / math.sqrt(d)
        out[:, :, i:i + 1] = scores.softmax(-1) @ v[:, :, lo:pos + 1]
    return out


@pytest.mark.parametrize("s,t", [(10, 10), (1, 10), (3, 10)])  # training, decoding one token, a chunk after a cache
def test_banded_sdpa_matches_hand_written(s, t):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, s, 8, generator=g)
    k, v = torch.randn(2, 2, t, 8, generator=g), torch.randn(2, 2, t, 8, generator=g)
    for window in (0, 2, 5, 20):
        assert torch.allclose(_sdpa(q, k, v, 0.0, window), _reference(q, k, v, window), atol=1e-5), window


def test_model_with_window_matches_transformers_mistral():
    window = 3  # GPT-NeoX's width w: each token sees itself and w earlier ones; HF Mistral counts w + 1
    cfg = llama_cfg(sliding_window_width=window)
    model = GPTModel(cfg, seed=5).eval()
    _randomise(model)
    sd = to_llama(model, cfg).state_dict()
    hf = MistralForCausalLM(MistralConfig(
        vocab_size=V, hidden_size=H, intermediate_size=FFN, num_hidden_layers=L, num_attention_heads=NQ,
        num_key_value_heads=NKV, rms_norm_eps=cfg.rms_norm_epsilon, rope_theta=cfg.rotary_emb_base,
        max_position_embeddings=32, tie_word_embeddings=False, sliding_window=window + 1,
        attn_implementation="eager")).eval()
    hf.load_state_dict(sd, strict=True)
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
        full = GPTModel(llama_cfg(), seed=5).eval()
        full.load_state_dict(model.state_dict())
        unwindowed = full(ids)
    assert (ours - ref).abs().max().item() < 1e-5
    assert (ours - unwindowed).abs().max().item() > 1e-3  # the window really cuts (S > window + 1)
