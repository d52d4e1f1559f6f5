"""Export a neox checkpoint (any TP/PP layout) to a Hugging Face transformers folder.

    python tools/convert_neox_to_hf.py --input_dir checkpoints/llama2_7b --config_file configs/llama2_7b.yml \
        --output_dir hf/llama2_7b --precision bf16

LLaMA configs (rmsnorm, rotary, gated silu MLP) become ``LlamaForCausalLM``; the classic NeoX
family (layernorm, gelu MLP) becomes ``GPTNeoXForCausalLM``. The folder holds config.json,
safetensors shards (+ model.safetensors.index.json when there are several) and, for SentencePiece
or HF tokenizers, the tokenizer files. Tensors are read memory-mapped one at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neox.convert import names, weights  # noqa: E402
from neox.convert.cli import DTYPES  # noqa: E402
from neox.errors import ConfigError, NeoXError, exit_code_of  # noqa: E402
from neox.model.attention import head_dim, num_kv_heads  # noqa: E402
from neox.model.mlp import is_gated, mlp_has_bias  # noqa: E402

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def is_llama(cfg: Any) -> bool:
    return cfg.norm == "rmsnorm" and cfg.pos_emb == "rotary" and is_gated(cfg)


def llama_config(cfg: Any, vocab_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of LlamaForCausalLM (legacy and current rope keys both written)."""
    if cfg.rotary_pct != 1.0:
        raise ConfigError(f"rotary_pct: LlamaForCausalLM rotates whole heads, config has {cfg.rotary_pct}")
    if cfg.activation not in ("silu", "swish", "swiglu") or cfg.gpt_j_residual:
        raise ConfigError(f"activation/gpt_j_residual: LlamaForCausalLM needs silu and sequential residuals, "
                          f"config has {cfg.activation}/{cfg.gpt_j_residual}")
    if cfg.use_qk_layernorm:
        raise ConfigError("use_qk_layernorm: not representable in LlamaForCausalLM")
    theta = float(cfg.rotary_emb_base)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": num_kv_heads(cfg), "head_dim": head_dim(cfg), "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings or cfg.seq_length,
        "rms_norm_eps": cfg.rms_norm_epsilon, "rope_theta": theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": not cfg.no_weight_tying, "attention_bias": cfg.use_bias_in_attn_linear,
        "mlp_bias": mlp_has_bias(cfg), "attention_dropout": 0.0, "initializer_range": cfg.init_method_std,
        "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype],
    }


def gpt_neox_config(cfg: Any, vocab_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of GPTNeoXForCausalLM."""
    if cfg.norm != "layernorm" or is_gated(cfg) or cfg.activation not in ("gelu", "relu"):
        raise ConfigError(f"norm/mlp_type/activation: GPTNeoXForCausalLM needs layernorm and a gelu/relu MLP, "
                          f"config has {cfg.norm}/{cfg.mlp_type}/{cfg.activation}")
    if not (mlp_has_bias(cfg) and cfg.use_bias_in_norms) or cfg.pos_emb != "rotary":
        raise ConfigError("use_bias_in_mlp/use_bias_in_norms/pos_emb: GPTNeoXForCausalLM needs MLP and norm biases "
                          "and rotary positions")
    theta, pct = float(cfg.rotary_emb_base), float(cfg.rotary_pct)
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        "vocab_size": vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "hidden_act": cfg.activation, "rotary_pct": pct, "rotary_emb_base": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": pct},
        "max_position_embeddings": cfg.max_position_embeddings or cfg.seq_length,
        "layer_norm_eps": cfg.layernorm_epsilon, "use_parallel_residual": cfg.gpt_j_residual,
        "attention_bias": cfg.use_bias_in_attn_linear, "tie_word_embeddings": not cfg.no_weight_tying,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "initializer_range": cfg.init_method_std,
        "use_cache": True, "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype],
    }


def write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int,
                      dtype: torch.dtype) -> tuple[int, int]:
    """Stream (name, tensor) into model-0000i-of-0000n.safetensors shards; returns (bytes, shards)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total = 0, 0
    files: list[str] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[0], str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shards[0]})
        files.append(name)
        shards[0] = {}

    for name, t in tqdm(tensors, desc=f"writing {out}", unit="tensor"):
        t = t.to(dtype).contiguous().clone()
        if shards[0] and size + t.nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[0][name] = t
        size += t.nbytes
        total += t.nbytes
    flush()
    _rename_shards(out, files, weight_map, total)
    return total, len(files)


def _rename_shards(out: Path, files: list[str], weight_map: dict[str, str], total: int) -> None:
    if len(files) == 1:
        (out / files[0]).rename(out / "model.safetensors")
        return
    final = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for f, g in final.items():
        (out / f).rename(out / g)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tokenizer(tok_cfg: Any, out: Path, max_len: int) -> list[str]:
    """Copy the tokenizer files transformers can load; returns the names written."""
    if tok_cfg is None or not tok_cfg.vocab_file or not Path(tok_cfg.vocab_file).is_file():
        return []
    if tok_cfg.tokenizer_type == "SPMTokenizer":
        shutil.copyfile(tok_cfg.vocab_file, out / "tokenizer.model")
        conf = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False, "model_max_length": max_len, "legacy": True}
        names = ["tokenizer.model"]
    elif tok_cfg.tokenizer_type == "HFTokenizer":
        shutil.copyfile(tok_cfg.vocab_file, out / "tokenizer.json")
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
        names = ["tokenizer.json"]
    else:
        return []
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return [*names, "tokenizer_config.json"]


def convert(input_dir: str | Path, cfg: Any, output_dir: str | Path, *, precision: str = "fp32",
            vocab_size: int | None = None, tokenizer: Any = None, max_shard_gib: float = 5.0) -> Path:
    """neox checkpoint -> transformers folder; ``vocab_size`` unpads the embedding (default: keep padding)."""
    start = time.perf_counter()
    dtype = DTYPES[precision]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = weights.read_full_weights(input_dir, cfg)
    vocab = vocab_size or cfg.padded_vocab_size or full["embedding.word_embeddings.weight"].shape[0]
    family = names.HF_LLAMA if is_llama(cfg) else names.HF_GPTNEOX
    conf = llama_config(cfg, vocab, dtype) if family is names.HF_LLAMA else gpt_neox_config(cfg, vocab, dtype)
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    nbytes, nshards = write_safetensors(names.to_family(full, cfg, family, vocab), out, int(max_shard_gib * 2**30), dtype)
    write_tokenizer(tokenizer, out, cfg.max_position_embeddings or cfg.seq_length)
    secs = time.perf_counter() - start
    print(f"exported {conf['architectures'][0]}: {nbytes / 2**30:.2f} GiB in {nshards} shard(s), {secs:.1f} s "
          f"({nbytes / 2**20 / max(secs, 1e-9):.0f} MiB/s) -> {out}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_dir", required=True, help="neox checkpoint folder (with latest) or a tag folder")
    p.add_argument("--config_file", required=True, nargs="+", help="neox YAML config(s) of the model")
    p.add_argument("--output_dir", required=True, help="transformers folder to write")
    p.add_argument("--precision", choices=sorted(DTYPES), default="fp32", help="dtype of the exported weights")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="rows of the exported embedding (default: the tokenizer's vocabulary, else the padded size)")
    p.add_argument("--max_shard_size_gib", type=float, default=5.0, help="largest safetensors shard")
    return p.parse_args(argv)


def tokenizer_vocab_size(tok_cfg: Any) -> int | None:
    """The true vocabulary when the tokenizer file is readable (to drop the padding rows)."""
    try:
        from neox.tokenizer.build import build_tokenizer

        return build_tokenizer(tok_cfg).vocab_size
    except (ImportError, NeoXError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    def run() -> None:
        from neox.config.args import NeoXArgs

        args = NeoXArgs.from_ymls(a.config_file)
        vocab = a.vocab_size or tokenizer_vocab_size(args.tokenizer)
        convert(a.input_dir, args.model, a.output_dir, precision=a.precision, vocab_size=vocab,
                tokenizer=args.tokenizer, max_shard_gib=a.max_shard_size_gib)

    return exit_code_of(run)


if __name__ == "__main__":
    sys.exit(main())
