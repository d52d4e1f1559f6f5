"""Meta raw checkpoints -> neox -> Hugging Face, checked against transformers' own conversion formula.

The reference HF state dict is built from the Meta shards exactly as transformers'
convert_llama_weights_to_hf.py (v4.x) builds it; that formula is copied here on purpose so the test
does not share code with neox.convert.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_core.tensor_parallel.utils import shard, unshard
from neox.config.model import ModelConfig
from neox.convert import names, weights
from neox.errors import ConfigError
from neox.model.layout import full_shapes, model_layout

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 128
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB, "multiple_of": 32,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0}
FFN = 224  # Meta: int(1.3 * int(2 * 4 * 64 / 3)) = 221, rounded up to a multiple of 32


def tool(name: str):
    """Import tools/<name>.py (tools/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def model_cfg(**over) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, attention_type="groupedquery",
                seq_length=32, max_position_embeddings=64, intermediate_size=FFN, norm="rmsnorm",
                rms_norm_epsilon=1e-5, pos_emb="rotary", rotary_emb_base=500000.0, mlp_type="llama",
                activation="silu", use_bias_in_norms=False, use_bias_in_attn_linear=False, use_bias_in_mlp=False,
                no_weight_tying=True, hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=128)
    base.update(over)
    return ModelConfig(**base)


def make_meta_checkpoint(folder: Path, num_shards: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random full Meta tensors, written split over ``num_shards`` files as Meta splits them."""
    g = torch.Generator().manual_seed(seed)
    dim, kv = PARAMS["dim"], PARAMS["n_kv_heads"] * PARAMS["dim"] // PARAMS["n_heads"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    full = {"tok_embeddings.weight": r(VOCAB, dim), "norm.weight": 1 + r(dim), "output.weight": r(VOCAB, dim)}
    for i in range(PARAMS["n_layers"]):
        full.update({f"layers.{i}.attention.wq.weight": r(dim, dim), f"layers.{i}.attention.wk.weight": r(kv, dim),
                     f"layers.{i}.attention.wv.weight": r(kv, dim), f"layers.{i}.attention.wo.weight": r(dim, dim),
                     f"layers.{i}.feed_forward.w1.weight": r(FFN, dim), f"layers.{i}.feed_forward.w2.weight": r(dim, FFN),
                     f"layers.{i}.feed_forward.w3.weight": r(FFN, dim),
                     f"layers.{i}.attention_norm.weight": 1 + r(dim), f"layers.{i}.ffn_norm.weight": 1 + r(dim)})
    split_rows = ("wq", "wk", "wv", "w1", "w3", "output")
    split_cols = ("wo", "w2", "tok_embeddings")
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        shard = {}
        for name, t in full.items():
            base = name.split(".")[-2]
            dim_ = 0 if base in split_rows else 1 if base in split_cols else None
            shard[name] = t.clone() if dim_ is None else torch.chunk(t, num_shards, dim=dim_)[s].clone()
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    (folder / "params.json").write_text(json.dumps(PARAMS))
    return full


def reference_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """transformers' convert_llama_weights_to_hf.py (v4.x), copied: Meta shards -> LlamaForCausalLM weights."""
    params = json.loads((folder / "params.json").read_text())
    files = sorted(folder.glob("consolidated.*.pth"))
    num_shards = len(files)
    loaded = [torch.load(f, weights_only=True) for f in files]
    n_heads, dim = params["n_heads"], params["dim"]
    n_heads_per_shard = n_heads // num_shards
    dims_per_head = dim // n_heads
    num_key_value_heads = params["n_kv_heads"]
    num_local_key_value_heads = num_key_value_heads // num_shards
    key_value_dim = dims_per_head * num_key_value_heads

    def permute(w, n_heads, dim1=dim, dim2=dim):
        return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

    sd = {}
    for i in range(params["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = loaded[0][f"layers.{i}.attention_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = loaded[0][f"layers.{i}.ffn_norm.weight"]
        sd[p + "self_attn.q_proj.weight"] = permute(torch.cat(
            [x[f"layers.{i}.attention.wq.weight"].view(n_heads_per_shard, dims_per_head, dim) for x in loaded],
            dim=0).reshape(dim, dim), n_heads=n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute(torch.cat(
            [x[f"layers.{i}.attention.wk.weight"].view(num_local_key_value_heads, dims_per_head, dim) for x in loaded],
            dim=0).reshape(key_value_dim, dim), num_key_value_heads, key_value_dim, dim)
        sd[p + "self_attn.v_proj.weight"] = torch.cat(
            [x[f"layers.{i}.attention.wv.weight"].view(num_local_key_value_heads, dims_per_head, dim) for x in loaded],
            dim=0).reshape(key_value_dim, dim)
        sd[p + "self_attn.o_proj.weight"] = torch.cat([x[f"layers.{i}.attention.wo.weight"] for x in loaded], dim=1)
        sd[p + "mlp.gate_proj.weight"] = torch.cat([x[f"layers.{i}.feed_forward.w1.weight"] for x in loaded], dim=0)
        sd[p + "mlp.down_proj.weight"] = torch.cat([x[f"layers.{i}.feed_forward.w2.weight"] for x in loaded], dim=1)
        sd[p + "mlp.up_proj.weight"] = torch.cat([x[f"layers.{i}.feed_forward.w3.weight"] for x in loaded], dim=0)
    sd["model.norm.weight"] = loaded[0]["norm.weight"]
    sd["model.embed_tokens.weight"] = torch.cat([x["tok_embeddings.weight"] for x in loaded], dim=1)
    sd["lm_head.weight"] = torch.cat([x["output.weight"] for x in loaded], dim=0)
    return sd


def reference_llama(folder: Path):
    """LlamaForCausalLM holding the Meta weights by transformers' conventions (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=FFN, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                       rope_theta=PARAMS["rope_theta"], tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(conf).eval()
    missing = model.load_state_dict(reference_hf_state_dict(folder), strict=False)
    assert not missing.unexpected_keys and all("rotary" in k for k in missing.missing_keys)
    return model


@pytest.fixture(scope="module")
def meta_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    for n in (1, 2):
        make_meta_checkpoint(root / f"meta{n}", n, seed=n)
    return root


@pytest.mark.parametrize("shards,tp", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_meta_to_neox_matches_transformers_conversion(meta_dirs, tmp_path, shards, tp):
    conv = tool("convert_raw_llama_weights_to_neox")
    cfg = model_cfg()
    tag = conv.convert(meta_dirs / f"meta{shards}", cfg, tmp_path / "ckpt", tp, progress=False)
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step0"
    assert sorted(p.name for p in tag.iterdir()) == [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    padded = 128 * tp
    shard0 = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    # the TP shard layout of internals.md: rank 0 holds [q of heads 0..; k of its kv heads; v of its kv heads]
    assert shard0["layers.0.attention.query_key_value.weight"].shape == ((4 + 2 + 2) * 16 // tp, 64)
    assert shard0["embedding.word_embeddings.weight"].shape == (padded // tp, 64)
    cfg_p = dataclasses.replace(cfg, padded_vocab_size=padded)
    full = weights.read_full_weights(tmp_path / "ckpt", cfg_p)
    assert set(full) == set(full_shapes(model_layout(cfg_p)))
    ours = dict(names.to_family(full, cfg_p, names.HF_LLAMA, vocab_size=VOCAB))
    ref = reference_hf_state_dict(meta_dirs / f"meta{shards}")
    assert set(ours) == set(ref)
    for name, t in ref.items():
        assert torch.equal(ours[name], t), name
    assert not full["embedding.word_embeddings.weight"][VOCAB:].any()


def test_shard_layout_matches_internals():
    cfg = model_cfg()
    d, q, kv = 16, 64, 32
    full = torch.arange((q + 2 * kv) * 2, dtype=torch.float32).reshape(q + 2 * kv, 2)
    layout = model_layout(cfg)
    qkv = layout["layers.0.attention.query_key_value.weight"].split
    shards = [shard(full, qkv, r, 2) for r in range(2)]
    Q, K, V = full[:q], full[q:q + kv], full[q + kv:]
    assert torch.equal(shards[1], torch.cat([Q[2 * d:], K[d:], V[d:]]))
    assert torch.equal(unshard(shards, qkv), full)
    lin1 = torch.randn(2 * FFN, 3)
    lin1_split = layout["layers.1.mlp.linear1.weight"].split
    s = [shard(lin1, lin1_split, r, 2) for r in range(2)]
    assert torch.equal(s[0], torch.cat([lin1[:FFN // 2], lin1[FFN:FFN + FFN // 2]]))
    assert torch.equal(unshard(s, lin1_split), lin1)
    w = torch.randn(64, 32)
    assert torch.equal(names.rotate_half_to_meta(names.meta_to_rotate_half(w, 4), 4), w)


def test_params_json_disagreements_are_all_named(meta_dirs, tmp_path):
    conv = tool("convert_raw_llama_weights_to_neox")
    cfg = model_cfg(rotary_emb_base=10000.0, num_kv_heads=4, intermediate_size=256)
    with pytest.raises(ConfigError) as e:
        conv.convert(meta_dirs / "meta1", cfg, tmp_path / "x", 1, progress=False)
    msg = str(e.value)
    assert "params.json" in msg and "rotary_emb_base" in msg and "num_kv_heads" in msg and "intermediate_size" in msg
    assert conv.meta_ffn_dim(4096, 256, None) == 11008  # LLaMA-2 7B
    assert conv.meta_ffn_dim(8192, 256, 1.0) == 22016  # CodeLlama 34B
    assert conv.meta_ffn_dim(8192, 4096, 1.3) == 28672  # LLaMA-2 70B


def test_hf_export_loads_and_matches_logits(meta_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    conv, export = tool("convert_raw_llama_weights_to_neox"), tool("convert_neox_to_hf")
    cfg = model_cfg()
    conv.convert(meta_dirs / "meta2", cfg, tmp_path / "ckpt", 2, progress=False)
    export.convert(tmp_path / "ckpt", dataclasses.replace(cfg, padded_vocab_size=256), tmp_path / "hf",
                   vocab_size=VOCAB, max_shard_gib=100_000 / 2**30)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # forced several shards
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ref = reference_llama(meta_dirs / "meta2")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (hf(ids).logits - ref(ids).logits).abs().max().item()
    assert err < 1e-5


def test_llemma_34b_config_agrees_with_codellama_params():
    """CodeLlama-34b's published params.json against configs/llemma_34b.yml (as derived by the config system)."""
    from neox.config import NeoXArgs

    params = {"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 256,
              "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000, "vocab_size": 32000}
    args = NeoXArgs.from_ymls([str(ROOT / "configs" / "llemma_34b.yml")], world_size=8)
    tool("convert_raw_llama_weights_to_neox").check_params(params, args.model, 32000, "params.json")
    with pytest.raises(ConfigError, match="num_kv_heads"):
        tool("convert_raw_llama_weights_to_neox").check_params({**params, "n_kv_heads": 64}, args.model, 32000, "p")


def test_llemma_7b_config_takes_codellama_7b_only_with_keep_config_rotary_base(capsys):
    """CodeLlama-7b (rope_theta 1e6) into configs/llemma_7b.yml (rotary base 1e4, as Llemma 7B trains):
    refused by default, naming rotary_emb_base; accepted with the flag, which still names it."""
    from neox.config import NeoXArgs

    params = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5,
              "rope_theta": 1000000, "vocab_size": 32016}
    args = NeoXArgs.from_ymls([str(ROOT / "configs" / "llemma_7b.yml")], world_size=2)
    check = tool("convert_raw_llama_weights_to_neox").check_params
    with pytest.raises(ConfigError, match="rotary_emb_base"):
        check(params, args.model, 32016, "params.json")
    check(params, args.model, 32016, "params.json", keep_config_rotary_base=True)
    assert "rope_theta 1e+06" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="num_layers"):
        check({**params, "n_layers": 30}, args.model, 32016, "params.json", keep_config_rotary_base=True)
