"""ModelConfig: the transformer's shape, norms, positions, MLP, biases, init and activation checkpointing.

Field names are the flat GPT-NeoX keys; each field's docstring is its entry in docs/config.md.
``intermediate_size``, ``padded_vocab_size``, ``num_kv_heads``, ``max_position_embeddings`` and
``attention_config`` are completed by ``neox.config.derive`` before the config is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    """Model arguments."""

    num_layers: int | None = None
    """Number of transformer layers."""

    hidden_size: int | None = None
    """Transformer hidden size."""

    num_attention_heads: int | None = None
    """Number of attention (query) heads."""

    num_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention). None: the same as num_attention_heads."""

    attention_type: Literal["multihead", "groupedquery", "multiquery"] = "multihead"
    """Kind of attention heads: 'multihead', 'groupedquery' (uses num_kv_heads) or 'multiquery' (one KV head)."""

    seq_length: int | None = None
    """Maximum sequence length to process (tokens per training sample)."""

    max_position_embeddings: int | None = None
    """Number of positions the model can address. None: seq_length."""

    intermediate_size: int | None = None
    """MLP inner dimension; after derivation, per branch of a gated MLP. As NeoX: with mlp_type llama it is per branch (default 8h/3 rounded up to 256); with activation swiglu/geglu/reglu it counts both branches before NeoX's 2/3 scaling (default 4h), giving round_up(int(size*2/3)//2, mlp_multiple_of) per branch; otherwise 4h by default."""

    expansion_factor: float | None = None
    """If set and intermediate_size is None, the MLP inner dimension is expansion_factor * hidden_size."""

    mlp_multiple_of: int = 1
    """Gated MLPs written the current NeoX way (activation swiglu/geglu/reglu) round their inner dimension up to a multiple of this (mlp_type: llama always uses 256, as NeoX did)."""

    padded_vocab_size: int | None = None
    """Embedding rows: the tokenizer's vocabulary padded to make_vocab_size_divisible_by * model_parallel_size. Derived; set it only to override."""

    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary so that its size divides by this value times model_parallel_size."""

    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation layer: 'layernorm' or 'rmsnorm'."""

    layernorm_epsilon: float = 1.0e-5
    """LayerNorm epsilon."""

    rms_norm_epsilon: float = 1.0e-8
    """RMSNorm epsilon."""

    pos_emb: Literal["rotary", "learned", "none"] = "learned"
    """Positional embedding: 'rotary', 'learned' or 'none'."""

    rotary_pct: float = 1.0
    """Fraction of each head's dimensions that rotary embeddings rotate."""

    rotary_emb_base: float = 10000
    """Base (theta) of the rotary embedding frequencies."""

    mlp_type: Literal["regular", "llama"] = "regular"
    """MLP kind: 'regular' (linear, activation, linear) or 'llama' (gated: act(gate) * up, then down)."""

    activation: Literal["gelu", "geglu", "relu", "silu", "swish", "swiglu", "reglu"] = "gelu"
    """Activation function. 'swiglu' (and 'geglu', 'reglu') select the gated MLP with silu (gelu, relu); 'swish' = 'silu'. After derivation: gelu, relu or silu, with mlp_type saying whether the MLP is gated."""

    use_bias_in_norms: bool = True
    """Give the norm layers a bias (LayerNorm only; RMSNorm has none)."""

    use_bias_in_attn_linear: bool = True
    """Give the attention's query_key_value and dense layers a bias."""

    use_bias_in_mlp: bool = True
    """Give the MLP's linear layers a bias."""

    no_weight_tying: bool = False
    """Use a separate output layer instead of the transposed input embedding."""

    gpt_j_residual: bool = False
    """GPT-J parallel residual: x = x + attn(ln1(x)) + mlp(ln2(x)) instead of the sequential form."""

    gpt_j_tied: bool = False
    """With gpt_j_residual, use one norm for both attention and MLP (ln1 = ln2)."""

    output_layer_parallelism: Literal["column", "row"] = "column"
    """How the output layer is split over tensor-parallel ranks. neox splits it by vocabulary ('column'); 'row' (GPT-NeoX's split over the hidden dimension) is not implemented and is refused when the config is read."""

    attention_config: list[str] = field(default_factory=list)
    """Attention kind per layer. Written as NeoX pairs, e.g. [[["global"], 12]] or [[["flash"], 32]]; expanded to one entry per layer (counts must sum to num_layers). 'global' and 'flash' are both full causal attention ('flash' asks for the flash kernel). Empty: global everywhere."""

    init_method: Literal[
        "normal", "scaled_normal", "xavier_uniform", "xavier_normal", "wang_init", "small_init", "orthogonal", "scaled_orthogonal",
        "single_residual_scaled_normal",
    ] = "normal"
    """Init of every weight except residual outputs (attention dense, MLP linear2)."""

    output_layer_init_method: Literal[
        "normal", "scaled_normal", "xavier_uniform", "xavier_normal", "wang_init", "small_init", "orthogonal", "scaled_orthogonal",
        "single_residual_scaled_normal",
    ] = "scaled_normal"
    """Init of the residual output layers (attention dense, MLP linear2). 'scaled_normal': init_method_std / sqrt(2 * num_layers); 'single_residual_scaled_normal' (GPT-NeoX's, for one residual branch per layer): init_method_std / sqrt(num_layers)."""

    init_method_std: float = 0.02
    """Standard deviation of the 'normal' and 'scaled_normal' inits."""

    hidden_dropout: float = 0.0
    """Dropout on the embeddings and after the attention and MLP blocks."""

    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""

    checkpoint_activations: bool = False
    """Recompute each block's activations in the backward pass (activation checkpointing)."""

    checkpoint_num_layers: int = 1
    """Layers per activation-checkpoint chunk."""

    partition_activations: bool = False
    """Split checkpointed activations across tensor-parallel ranks (DeepSpeed activation checkpointing)."""

    torch_compile_tuning: bool = True
    """neox: with torch_compile, let Inductor tune the launch configuration of each kernel it generates (coordinate-descent tuning): a longer cold compile (about a minute more for TinyLlama-1.1B; a warm Inductor cache keeps the tuned kernels), then measured +1.5-2% training throughput on an H100 (docs/performance.md). false: PyTorch's untuned launch configurations."""

    torch_compile_memory_budget: float = 1.0
    """neox: with torch_compile, the share (0-1] of the activation memory the compiled blocks keep for backward; below 1, the compiler recomputes the cheapest ops (pointwise first) to stay under it: selective activation checkpointing chosen per op by PyTorch's partitioner (torch._functorch.config.activation_memory_budget). 1.0: PyTorch's default."""

    fp32_residual_connection: bool = False
    """Keep the residual stream (embedding output and every block's sum) in fp32 under torch_autocast. Off (Megatron's default): it runs in the autocast dtype, as it does with bf16/fp16 parameters, which halves the memory traffic of norms and residual adds. Only meaningful with fp32 parameters (precision fp32)."""

    torch_compile: bool | None = None
    """neox: compile each transformer block (and the loss, at tensor parallel 1) with torch.compile (fuses norms, rotary, SwiGLU). None (unset): on for ranks that see CUDA, eager on CPU ranks; false: eager everywhere. Inductor's caches persist (TORCHINDUCTOR_CACHE_DIR, default {save}/.cache/torchinductor), so a restart or resume compiles warm."""



    use_qk_layernorm: bool = False
    """GPT-NeoX: normalise queries and keys per head before attention. Not implemented in neox: only false is accepted."""

    sliding_window_width: int | None = None
    """If set, each token attends to itself and this many previous tokens (GPT-NeoX's flash-attn window_size=(w, -1)), in every layer. flash_attn applies it in its kernel; SDPA takes a banded mask, which rules out its flash kernel (slower on GPU). None: full causal attention."""
