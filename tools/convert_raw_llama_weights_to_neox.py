"""Convert Meta / CodeLlama raw checkpoints (params.json + consolidated.NN.pth) to a neox checkpoint.

    python tools/convert_raw_llama_weights_to_neox.py --input_dir llama-2-7b --config_file configs/llama2_7b.yml \
        --output_dir checkpoints/llama2_7b --num_output_shards 2

Meta splits each tensor over its model-parallel shards (wq/wk/wv/w1/w3/output by rows, wo/w2 by
columns, tok_embeddings along the embedding dimension, norms replicated); this tool merges them
back, turns Meta's interleaved rotary pairs into the rotate-half layout, fuses q/k/v and gate/up,
pads the vocabulary and writes ``num_output_shards`` tensor-parallel shards that ``load`` +
``finetune: true`` accepts. The shards are memory-mapped and each output rank is built and written on
its own, so peak memory is about one output rank (see docs/conversion.md).
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


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The MLP inner size exactly as Meta's llama/model.py computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def load_params(input_dir: Path) -> dict[str, Any]:
    path = input_dir / "params.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a Meta checkpoint folder has params.json and consolidated.NN.pth)")
    return json.loads(path.read_text())


def check_params(params: dict[str, Any], cfg: Any, vocab_rows: int, source: str,
                 keep_config_rotary_base: bool = False) -> None:
    """ConfigError naming every disagreement between params.json and the model config.

    ``keep_config_rotary_base``: a different ``rotary_emb_base`` is reported but allowed. The base is
    not stored in the weights, and continued pretraining may change it on purpose (Llemma 7B trains
    CodeLlama 7B, rope_theta 1e6, with base 10000).
    """
    dim, n_heads = params["dim"], params["n_heads"]
    expected = {
        "hidden_size": dim,
        "num_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_kv_heads": params.get("n_kv_heads") or n_heads,
        "rms_norm_epsilon": params.get("norm_eps", 1e-5),
        "rotary_emb_base": params.get("rope_theta", 10000.0),
        "intermediate_size": meta_ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        "norm": "rmsnorm",
        "pos_emb": "rotary",
        "rotary_pct": 1.0,
        "no_weight_tying": True,
        "use_bias_in_attn_linear": False,
        "use_bias_in_mlp": False,
    }
    actual = {k: getattr(cfg, k) for k in expected}
    actual.update(num_kv_heads=num_kv_heads(cfg), use_bias_in_mlp=mlp_has_bias(cfg))
    bad = [f"{names.describe_key(k)}: params.json implies {v!r}, config has {actual[k]!r}" for k, v in expected.items()
           if (actual[k] != v if not isinstance(v, float) else abs(float(actual[k]) - v) > 1e-12 * max(1.0, abs(v)))]
    theta = params.get("rope_theta", 10000.0)
    if keep_config_rotary_base and abs(float(cfg.rotary_emb_base) - theta) > 1e-12 * max(1.0, theta):
        bad = [b for b in bad if not b.startswith(names.describe_key("rotary_emb_base"))]
        print(f"neox: note: {source}: rope_theta {theta:g}, training with the config's rotary_emb_base "
              f"{cfg.rotary_emb_base:g} (--keep_config_rotary_base)", file=sys.stderr)
    if not (is_gated(cfg) and cfg.activation in ("silu", "swish", "swiglu")):
        bad.append(f"mlp_type/activation: LLaMA needs a gated silu MLP, config has {cfg.mlp_type}/{cfg.activation}")
    if cfg.padded_vocab_size is not None and cfg.padded_vocab_size < vocab_rows:
        bad.append(f"padded_vocab_size: {cfg.padded_vocab_size} is smaller than the checkpoint's {vocab_rows} tokens")
    if bad:
        raise ConfigError(f"{source} disagrees with the config: " + "; ".join(bad))


class MetaShards(Mapping):
    """Meta's full (merged) tensors by Meta name, from memory-mapped consolidated.NN.pth files."""

    def __init__(self, input_dir: Path):
        files = sorted(input_dir.glob("consolidated.*.pth"))
        if not files:
            raise CheckpointError(f"{input_dir}: no consolidated.NN.pth files")
        self.files = files
        self.shards = [weights.load_tensors(f) for f in files]
        self.names = [n for n in self.shards[0] if n != "rope.freqs"]  # LLaMA-1 stores its rotary table

    def __getitem__(self, name: str) -> torch.Tensor:
        dim = names.meta_shard_dim(name)
        parts = [s[name] for s in self.shards]
        return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def padded_vocab(cfg: Any, vocab_rows: int, tp: int) -> int:
    if cfg.padded_vocab_size is not None:
        return cfg.padded_vocab_size
    return pad_vocab_size(vocab_rows, cfg.make_vocab_size_divisible_by, tp)


def convert(input_dir: str | Path, cfg: Any, output_dir: str | Path, tp: int, pp: int = 0,
            dtype: torch.dtype | None = None, progress: bool = True, keep_config_rotary_base: bool = False) -> Path:
    """Meta checkpoint -> neox checkpoint with ``tp`` tensor-parallel shards; returns the tag directory."""
    input_dir = Path(input_dir)
    params = load_params(input_dir)
    meta = MetaShards(input_dir)
    n_kv = params.get("n_kv_heads") or params["n_heads"]
    if n_kv % len(meta.files):
        raise CheckpointError(f"{input_dir}: {len(meta.files)} shards do not split {n_kv} kv heads evenly")
    vocab_rows = meta.shards[0]["output.weight"].shape[0] * len(meta.files)
    check_params(params, cfg, vocab_rows, str(input_dir / "params.json"), keep_config_rotary_base)
    cfg = dataclasses.replace(cfg, padded_vocab_size=padded_vocab(cfg, vocab_rows, tp))
    full = names.from_family(meta, cfg, names.META)
    return weights.write_weights(full, cfg, output_dir, tp, pp, dtype=dtype, progress=progress)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_dir", required=True, help="folder with params.json and consolidated.NN.pth")
    add_output_args(p, output_help="checkpoint folder (gets global_step0/ and latest)", torch_dtype_names=True)
    p.add_argument("--keep_config_rotary_base", action="store_true",
                   help="allow the config's rotary_emb_base to differ from params.json's rope_theta "
                        "(continued pretraining with a new RoPE base, as Llemma 7B does)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    def run() -> None:
        from neox.config.args import NeoXArgs

        args = NeoXArgs.from_ymls(a.config_file)
        convert(a.input_dir, args.model, a.output_dir, *output_layout(a, args),
                keep_config_rotary_base=a.keep_config_rotary_base)

    return exit_code_of(run)


if __name__ == "__main__":
    sys.exit(main())
