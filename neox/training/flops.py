"""FLOPs accounting (DESIGN.md §6): model FLOPs by the PaLM formula, hardware FLOPs, MFU.

Model FLOPs per token are ``6 N + 12 L h s`` (N: non-embedding parameters including the output
layer, L layers, h hidden size, s sequence length): 2 FLOPs per weight per token forward, twice that
backward, plus the attention score and value matmuls. With activation checkpointing the forward
pass runs twice, so the hardware does 4/3 of the model FLOPs; that figure is reported separately and
never enters MFU.
"""

from __future__ import annotations

import os

from neox.config import ModelConfig
from neox.config.derive import mlp_has_bias, mlp_shape

# Dense bf16 peaks (TFLOP/s, datasheet). Matched as substrings of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}
PEAK_ENV = "NEOX_PEAK_TFLOPS"


def _mlp_params(cfg: ModelConfig, h: int) -> int:
    shape = mlp_shape(cfg)
    ffn, gated = shape.intermediate_size, shape.gated
    weights = (3 if gated else 2) * h * ffn
    bias = ((2 * ffn if gated else ffn) + h) if mlp_has_bias(cfg) else 0
    return weights + bias


def non_embedding_params(cfg: ModelConfig) -> int:
    """N of the formula: every parameter except the input (and position) embeddings.

    The output layer counts even when tied to the input embedding, because its matmul is done.
    """
    h, nq = cfg.hidden_size, cfg.num_attention_heads
    nkv = cfg.num_kv_heads or nq
    d = h // nq
    qkv = (nq + 2 * nkv) * d * (h + (1 if cfg.use_bias_in_attn_linear else 0))
    dense = nq * d * h + (h if cfg.use_bias_in_attn_linear else 0)
    norm_params = h * (2 if cfg.norm == "layernorm" and cfg.use_bias_in_norms else 1)
    per_layer = qkv + dense + _mlp_params(cfg, h) + 2 * norm_params
    vocab = cfg.padded_vocab_size or 0
    return cfg.num_layers * per_layer + norm_params + vocab * h


def flops_per_token(cfg: ModelConfig) -> int:
    """Model FLOPs per trained token (forward + backward): ``6 N + 12 L h s``."""
    return 6 * non_embedding_params(cfg) + 12 * cfg.num_layers * cfg.hidden_size * cfg.seq_length


def hardware_flops_per_token(cfg: ModelConfig) -> int:
    """FLOPs the devices actually execute: with activation checkpointing the forward runs twice."""
    model = flops_per_token(cfg)
    return model * 4 // 3 if cfg.checkpoint_activations else model


def peak_tflops(device_name: str | None, configured: float | None = None) -> float | None:
    """Peak TFLOP/s per device, MFU's denominator: ``configured`` (the ``peak_theoretical_tflops`` key) if
    set, else ``$NEOX_PEAK_TFLOPS``, else the dense bf16 datasheet table, else None."""
    if configured:
        return float(configured)
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


def throughput(cfg: ModelConfig, tokens: int, seconds: float, world_size: int,
               peak: float | None) -> dict[str, float | None]:
    """TFLOP/s per GPU (model and hardware) and MFU for ``tokens`` trained in ``seconds``."""
    seconds = max(seconds, 1e-9)
    tflops = flops_per_token(cfg) * tokens / seconds / world_size / 1e12
    hw = hardware_flops_per_token(cfg) * tokens / seconds / world_size / 1e12
    return {"tflops_per_gpu": tflops, "hardware_tflops_per_gpu": hw, "mfu": tflops / peak if peak else None}
