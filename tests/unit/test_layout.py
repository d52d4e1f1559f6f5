"""The one parameter table (neox.model.layout) against what each tensor-parallel rank's model holds.

Reference: the full model built at TP 1 from a seed. A TP-t model of rank r, built from the same
seed with parallel_state set to that rank in this process, must hold exactly the declared shard of
every full tensor (weights are initialised as full tensors and cut by the layers themselves).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.tensor_parallel.utils import shard, unshard
from megatron_core.topology import Topology
from neox.model import GPTModel
from neox.model.layout import full_shapes, model_layout
from tests.unit.test_convert_hf import neox_cfg_for_gpt_neox
from tests.unit.test_convert_meta import model_cfg


@contextmanager
def as_tensor_rank(rank: int, tp: int):
    """parallel_state answering tensor-parallel rank ``rank`` of ``tp`` (groups None, no processes)."""
    saved = ps._STATE.topology, ps._STATE.rank
    ps._STATE.topology, ps._STATE.rank = Topology(tp, 1, 1), rank
    try:
        yield
    finally:
        ps._STATE.topology, ps._STATE.rank = saved


CONFIGS = {
    "llama_gqa_untied": lambda: model_cfg(num_attention_heads=8, num_kv_heads=4),
    "neox_learned_tied": lambda: neox_cfg_for_gpt_neox(pos_emb="learned", no_weight_tying=False),
    "neox_rotary_partial_untied": lambda: neox_cfg_for_gpt_neox(gpt_j_residual=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_declared_shards_are_what_each_rank_builds(name):
    cfg = dataclasses.replace(CONFIGS[name](), padded_vocab_size=256)
    full = {n: p.detach() for n, p in GPTModel(cfg, seed=7).named_parameters()}
    layout = model_layout(cfg)
    assert full_shapes(layout) == {n: tuple(t.shape) for n, t in full.items()}
    assert any(p.split is not None and p.split.sections for p in layout.values())
    assert ("output_layer.weight" in layout) == cfg.no_weight_tying
    for tp in (1, 2, 4):
        with as_tensor_rank(0, tp):
            assert model_layout(cfg) == layout  # the table does not depend on the size it is built at
        per_rank = []
        for r in range(tp):
            with as_tensor_rank(r, tp):
                model = GPTModel(cfg, seed=7)
            mine = dict(model.named_parameters())
            assert set(mine) == set(layout)
            for n, p in mine.items():
                split = layout[n].split
                assert torch.equal(shard(full[n], split, r, tp), p.detach()), (name, tp, r, n)
                if split is not None and tp > 1:
                    assert p.partition_dim == split.dim, n
            per_rank.append(mine)
        for n, t in full.items():
            assert torch.equal(unshard([m[n].detach() for m in per_rank], layout[n].split), t), (name, tp, n)
