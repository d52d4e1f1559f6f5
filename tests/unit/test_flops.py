"""FLOPs per token against a parameter count taken from an instantiated reference module."""

import pytest
import torch

from neox.config import ModelConfig
from neox.training import flops


def _llama_like(cfg: ModelConfig) -> int:
    """Count the non-embedding parameters of a hand-written LLaMA block stack (+ output layer)."""
    h, nq, nkv, ffn = cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads, cfg.intermediate_size
    d = h // nq
    layer = torch.nn.ModuleDict({
        "q": torch.nn.Linear(h, nq * d, bias=False), "k": torch.nn.Linear(h, nkv * d, bias=False),
        "v": torch.nn.Linear(h, nkv * d, bias=False), "o": torch.nn.Linear(nq * d, h, bias=False),
        "gate": torch.nn.Linear(h, ffn, bias=False), "up": torch.nn.Linear(h, ffn, bias=False),
        "down": torch.nn.Linear(ffn, h, bias=False), "n1": torch.nn.RMSNorm(h), "n2": torch.nn.RMSNorm(h),
    })
    per_layer = sum(p.numel() for p in layer.parameters())
    return cfg.num_layers * per_layer + h + cfg.padded_vocab_size * h


def _cfg(**kw) -> ModelConfig:
    base = dict(num_layers=3, hidden_size=64, num_attention_heads=4, num_kv_heads=2, seq_length=32,
                intermediate_size=96, padded_vocab_size=256, norm="rmsnorm", mlp_type="llama",
                activation="swiglu", use_bias_in_norms=False, use_bias_in_attn_linear=False,
                use_bias_in_mlp=False, pos_emb="rotary")
    base.update(kw)
    return ModelConfig(**base)


def test_non_embedding_params_match_a_reference_module():
    cfg = _cfg()
    assert flops.non_embedding_params(cfg) == _llama_like(cfg)


def test_palm_formula_and_recompute():
    cfg = _cfg()
    n = _llama_like(cfg)
    assert flops.flops_per_token(cfg) == 6 * n + 12 * 3 * 64 * 32
    ck = _cfg(checkpoint_activations=True)
    assert flops.hardware_flops_per_token(ck) == (6 * n + 12 * 3 * 64 * 32) * 4 // 3
    assert flops.hardware_flops_per_token(cfg) == flops.flops_per_token(cfg)


def test_tinyllama_shape_is_about_one_billion():
    cfg = _cfg(num_layers=22, hidden_size=2048, num_attention_heads=32, num_kv_heads=4,
               intermediate_size=5632, padded_vocab_size=32000, seq_length=4096)
    # 1.1B total minus the 65.5M input embedding; the output layer counts.
    assert flops.non_embedding_params(cfg) == pytest.approx(1.1e9 - 32000 * 2048, rel=0.02)


def test_mfu_and_peak(monkeypatch):
    cfg = _cfg()
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops(None) is None
    monkeypatch.setenv(flops.PEAK_ENV, "100")
    assert flops.peak_tflops(None) == 100.0
    tokens, secs = 10_000, 2.0
    out = flops.throughput(cfg, tokens, secs, world_size=2, peak=100.0)
    expect = flops.flops_per_token(cfg) * tokens / secs / 2 / 1e12
    assert out["tflops_per_gpu"] == pytest.approx(expect)
    assert out["mfu"] == pytest.approx(expect / 100.0)
    assert flops.throughput(cfg, tokens, secs, 1, None)["mfu"] is None
