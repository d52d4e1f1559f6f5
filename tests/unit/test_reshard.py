"""Resharding: Meta -> neox TP2 -> reshard TP1 -> HF is exact; vocabulary repadding; pipeline layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neox.convert import weights
from neox.model.layout import full_shapes, model_layout
from tests.unit.test_convert_meta import VOCAB, make_meta_checkpoint, model_cfg, reference_hf_state_dict, tool


@pytest.fixture(scope="module")
def tp2_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    make_meta_checkpoint(root / "meta", 2, seed=11)
    tool("convert_raw_llama_weights_to_neox").convert(root / "meta", model_cfg(), root / "tp2", 2, progress=False)
    return root


def test_meta_tp2_reshard_tp1_to_hf_is_exact(tp2_ckpt, tmp_path):
    from safetensors.torch import load_file

    reshard, export = tool("reshard_checkpoint"), tool("convert_neox_to_hf")
    cfg = model_cfg()
    tag = reshard.reshard(tp2_ckpt / "tp2", cfg, tmp_path / "tp1", 1, 0, progress=False)
    assert [p.name for p in tag.iterdir()] == ["mp_rank_00_model_states.pt"]
    module = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert module["embedding.word_embeddings.weight"].shape == (2 * VOCAB, 64)  # padding kept (divides by 1)
    export.convert(tmp_path / "tp1", dataclasses.replace(cfg, padded_vocab_size=2 * VOCAB), tmp_path / "hf",
                   vocab_size=VOCAB)
    ours = load_file(str(tmp_path / "hf" / "model.safetensors"))
    ref = reference_hf_state_dict(tp2_ckpt / "meta")
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[n], t) for n, t in ref.items())


def test_reshard_up_repads_vocab_and_keeps_tag(tmp_path):
    cfg = dataclasses.replace(model_cfg(make_vocab_size_divisible_by=1), padded_vocab_size=VOCAB + 2)
    g = torch.Generator().manual_seed(0)
    full = {n: torch.randn(*s, generator=g) for n, s in full_shapes(model_layout(cfg)).items()}
    weights.write_weights(full, cfg, tmp_path / "a", 1, 0, tag="global_step7", iteration=7, progress=False)
    (tmp_path / "a" / "global_step7" / "mp_rank_00_optim_states.pt").write_bytes(b"")
    tag = tool("reshard_checkpoint").reshard(tmp_path / "a", cfg, tmp_path / "b", 4, 0, progress=False)
    assert tag.name == "global_step7" and (tmp_path / "b" / "latest").read_text() == "global_step7"
    back = weights.read_full_weights(tmp_path / "b", dataclasses.replace(cfg, padded_vocab_size=132))
    emb = back["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 132 and torch.equal(emb[:VOCAB + 2], full["embedding.word_embeddings.weight"])
    assert not emb[VOCAB + 2:].any()
    for n, t in full.items():
        if n not in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert torch.equal(back[n], t), n
    state = torch.load(tag / "mp_rank_03_model_states.pt", weights_only=True)
    assert state["global_steps"] == 7 and state["mp_world_size"] == 4 and state["dp_world_size"] == 1


def test_pipeline_layout_round_trip(tp2_ckpt, tmp_path):
    pytest.importorskip("neox.model.pipe")
    reshard = tool("reshard_checkpoint")
    cfg = dataclasses.replace(model_cfg(), padded_vocab_size=2 * VOCAB)
    tag = reshard.reshard(tp2_ckpt / "tp2", cfg, tmp_path / "pipe", 2, 2, progress=False)
    assert any(p.name.startswith("layer_") for p in tag.iterdir())
    assert torch.load(tag / "mp_rank_01_model_states.pt", weights_only=True)["module"] is None
    back = reshard.reshard(tmp_path / "pipe", cfg, tmp_path / "plain", 1, 0, progress=False)
    a = weights.read_full_weights(tp2_ckpt / "tp2", cfg)
    b = weights.read_full_weights(back.parent, cfg)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
