"""Convert a Hugging Face LLaMA-family folder (LlamaForCausalLM, Mistral-style GQA, CodeLlama) to neox.

    python tools/convert_hf_to_neox.py --input_dir hf/llama2_7b --config_file configs/llama2_7b.yml \
        --output_dir checkpoints/llama2_7b --num_output_shards 4

Reads safetensors (sharded or not) or pytorch_model*.bin, checks config.json against the neox
config (every disagreement named), fuses q/k/v and gate/up, pads the vocabulary and writes
``num_output_shards`` tensor-parallel shards. GPTNeoXForCausalLM folders convert as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neox.config.derive import pad_vocab_size  # noqa: E402
from neox.convert import names, weights  # noqa: E402
from neox.convert.cli import add_output_args, output_layout  # noqa: E402
from neox.errors import CheckpointError, ConfigError, exit_code_of  # noqa: E402
from neox.model.attention import num_kv_heads  # noqa: E402
from neox.model.mlp import is_gated, mlp_has_bias  # noqa: E402


class HFWeights(Mapping):
    """Tensors of a transformers folder by name, read on access (safetensors) or memory-mapped (.bin)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._open = safe_open
        self.where: dict[str, Path] = {}
        self._bins: dict[Path, Any] = {}
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin files")
        for f in files:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as h:
                    self.where.update({k: f for k in h.keys()})  # noqa: SIM118 (safe_open is not a dict)
            else:
                self._bins[f] = weights.load_tensors(f)
                self.where.update({k: f for k in self._bins[f]})

    def __getitem__(self, name: str) -> torch.Tensor:
        f = self.where[name]
        if f in self._bins:
            return self._bins[f][name]
        with self._open(str(f), framework="pt") as h:
            return h.get_tensor(name)

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _rope_theta(conf: dict[str, Any]) -> float:
    return float((conf.get("rope_parameters") or {}).get("rope_theta", conf.get("rope_theta", 10000.0)))


def check_hf_config(conf: dict[str, Any], cfg: Any, source: str) -> None:
    """ConfigError naming every disagreement between config.json and the neox config."""
    llama = conf.get("model_type") != "gpt_neox"
    nh = conf["num_attention_heads"]
    expected = {
        "hidden_size": conf["hidden_size"], "num_layers": conf["num_hidden_layers"], "num_attention_heads": nh,
        "intermediate_size": conf["intermediate_size"], "rotary_emb_base": _rope_theta(conf),
        "no_weight_tying": not conf.get("tie_word_embeddings", not llama),
    }
    if llama:
        expected.update({"num_kv_heads": conf.get("num_key_value_heads") or nh, "norm": "rmsnorm",
                         "rms_norm_epsilon": conf.get("rms_norm_eps", 1e-6), "pos_emb": "rotary", "rotary_pct": 1.0,
                         "use_bias_in_attn_linear": conf.get("attention_bias", False),
                         "use_bias_in_mlp": conf.get("mlp_bias", False)})
    else:
        expected.update({"norm": "layernorm", "layernorm_epsilon": conf.get("layer_norm_eps", 1e-5),
                         "gpt_j_residual": conf.get("use_parallel_residual", True),
                         "rotary_pct": float((conf.get("rope_parameters") or {}).get(
                             "partial_rotary_factor", conf.get("rotary_pct", 0.25)))})
    if llama and conf.get("head_dim") not in (None, conf["hidden_size"] // nh):
        raise ConfigError(f"{source}: head_dim {conf['head_dim']} != hidden_size / num_attention_heads; not supported")
    actual = {k: getattr(cfg, k) for k in expected if k not in ("num_kv_heads", "use_bias_in_mlp")}
    actual.update(num_kv_heads=num_kv_heads(cfg), use_bias_in_mlp=mlp_has_bias(cfg))
    bad = [f"{names.describe_key(k)}: config.json implies {v!r}, config has {actual[k]!r}" for k, v in expected.items()
           if (abs(float(actual[k]) - v) > 1e-9 * max(1.0, abs(v)) if isinstance(v, float) else actual[k] != v)]
    if llama and not (is_gated(cfg) and cfg.activation in ("silu", "swish", "swiglu")):
        bad.append(f"mlp_type/activation: LLaMA needs a gated silu MLP, config has {cfg.mlp_type}/{cfg.activation}")
    if bad:
        raise ConfigError(f"{source} disagrees with the config: " + "; ".join(bad))


def convert(input_dir: str | Path, cfg: Any, output_dir: str | Path, tp: int, pp: int = 0,
            dtype: torch.dtype | None = None, progress: bool = True) -> Path:
    """transformers folder -> neox checkpoint with ``tp`` tensor-parallel shards; returns the tag directory."""
    folder = Path(input_dir)
    conf_path = folder / "config.json"
    if not conf_path.is_file():
        raise CheckpointError(f"{conf_path}: missing")
    conf = json.loads(conf_path.read_text())
    check_hf_config(conf, cfg, str(conf_path))
    family = names.HF_GPTNEOX if conf.get("model_type") == "gpt_neox" else names.HF_LLAMA
    source = HFWeights(folder)
    if family is names.HF_GPTNEOX and "embed_out.weight" not in source and "lm_head.weight" in source:
        source.where["embed_out.weight"] = source.where.pop("lm_head.weight")  # transformers >= 5 names
    vocab_rows = source[family.top[0][1][0]].shape[0]
    if cfg.padded_vocab_size is None:
        padded = pad_vocab_size(vocab_rows, cfg.make_vocab_size_divisible_by, tp)
        cfg = dataclasses.replace(cfg, padded_vocab_size=padded)
    elif cfg.padded_vocab_size < vocab_rows:
        raise ConfigError(f"padded_vocab_size: {cfg.padded_vocab_size} < the {vocab_rows} rows of {folder}")
    return weights.write_weights(names.from_family(source, cfg, family), cfg, output_dir, tp, pp, dtype=dtype,
                              progress=progress)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_dir", required=True, help="transformers folder (config.json + weights)")
    add_output_args(p, output_help="checkpoint folder (gets global_step0/ and latest)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    def run() -> None:
        from neox.config.args import NeoXArgs

        args = NeoXArgs.from_ymls(a.config_file)
        convert(a.input_dir, args.model, a.output_dir, *output_layout(a, args))

    return exit_code_of(run)


if __name__ == "__main__":
    sys.exit(main())
