"""CUDA-only: attention backends against the math path in bf16, and torch.compile without graph breaks.

Run on a GPU machine: ``python -m pytest -q tests/gpu/test_model_gpu.py``.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from neox.config.model import ModelConfig
from neox.model import GPTModel
from neox.model.flash import flash_kernel
from neox.model.gpt import rotary_for
from neox.model.init import ModelInit
from neox.model.transformer import TransformerBlock

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

B, S = 2, 512


def _cfg(**kw) -> ModelConfig:
    base = dict(
        num_layers=2, hidden_size=512, num_attention_heads=8, num_kv_heads=2, attention_type="groupedquery",
        seq_length=S, max_position_embeddings=S, intermediate_size=1024, padded_vocab_size=1024, norm="rmsnorm",
        rms_norm_epsilon=1e-6, pos_emb="rotary", rotary_emb_base=500000.0, mlp_type="llama", activation="silu",
        use_bias_in_norms=False, use_bias_in_attn_linear=False, no_weight_tying=True, attention_config=["flash", "flash"],
    )
    base.update(kw)
    return ModelConfig(**base)


def _run(model: GPTModel, ids: torch.Tensor, backend: SDPBackend | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the embedding gradient of a simple loss, under one SDPA backend."""
    model.zero_grad(set_to_none=True)
    if backend is None:
        logits = model(ids)
    else:
        with sdpa_kernel([backend]):
            logits = model(ids)
    logits.float().pow(2).mean().backward()
    return logits.float().detach(), model.embedding.word_embeddings.weight.grad.float().clone()


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # bf16 has an 8-bit mantissa; allow a few ulps of the tensor's scale.
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err < 2e-2, f"{what}: max error {err:.3g} of the tensor's scale"


@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION])
def test_sdpa_backend_matches_math(backend):
    torch.manual_seed(0)
    model = GPTModel(_cfg(), device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 1024, (B, S), device="cuda")
    ref_logits, ref_grad = _run(model, ids, SDPBackend.MATH)
    try:
        logits, grad = _run(model, ids, backend)
    except RuntimeError as err:  # e.g. cuDNN attention not built into this torch
        pytest.skip(f"{backend.name} unavailable: {err}")
    _close(logits, ref_logits, f"{backend.name} logits")
    _close(grad, ref_grad, f"{backend.name} embedding grad")


@pytest.mark.skipif(flash_kernel() is None, reason="no FlashAttention package installed")
def test_flash_attn_library_matches_math():
    torch.manual_seed(0)
    flash = GPTModel(_cfg(), device="cuda", dtype=torch.bfloat16)
    plain = GPTModel(_cfg(attention_config=["global", "global"]), device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 1024, (B, S), device="cuda")
    ref_logits, ref_grad = _run(plain, ids, SDPBackend.MATH)
    logits, grad = _run(flash, ids, None)
    _close(logits, ref_logits, "flash_attn logits")
    _close(grad, ref_grad, "flash_attn embedding grad")


@pytest.mark.parametrize("variant", ["llama", "neox"])
def test_block_compiles_without_graph_breaks(variant):
    cfg = _cfg() if variant == "llama" else _cfg(
        norm="layernorm", mlp_type="regular", activation="gelu", num_kv_heads=None, attention_type="multihead",
        use_bias_in_norms=True, use_bias_in_attn_linear=True, gpt_j_residual=True, rotary_pct=0.25,
        intermediate_size=2048,
    )
    block = TransformerBlock(cfg, 0, ModelInit(cfg, 1), device="cuda", dtype=torch.bfloat16)
    x = torch.randn(B, S, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rotary = rotary_for(cfg, torch.arange(S, device="cuda").expand(B, S))
    explanation = torch._dynamo.explain(block)(x, rotary)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, rotary)
    out.float().pow(2).mean().backward()
    compiled_grad = x.grad.clone()
    x.grad = None
    ref = block(x, rotary)
    ref.float().pow(2).mean().backward()
    _close(out.float(), ref.float(), "compiled block output")
    _close(compiled_grad.float(), x.grad.float(), "compiled block input grad")


def test_bf16_model_keeps_rotary_in_fp32():
    """Casting the model to bf16 leaves no rotary table to downcast: logits agree with fp32 weights
    rounded to bf16 at long-context positions."""
    cfg = _cfg(seq_length=8192, max_position_embeddings=8192)
    model = GPTModel(cfg, device="cuda").to(torch.bfloat16)
    assert not list(model.buffers())
    ids = torch.randint(0, 1024, (1, 64), device="cuda")
    pos = torch.arange(8000, 8064, device="cuda").unsqueeze(0)
    with torch.no_grad():
        out = model(ids, pos)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
