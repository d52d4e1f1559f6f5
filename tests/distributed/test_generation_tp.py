"""TP 2 on 2 gloo ranks: a converted Meta checkpoint gives transformers' logits and greedy tokens, and
DeepSpeed's ``load_checkpoint(load_module_only=True)`` (through neox.checkpoint.local) accepts it."""

from __future__ import annotations

import dataclasses

import torch

from tests.distributed.launch import run_distributed
from tests.unit.test_convert_meta import VOCAB, make_meta_checkpoint, model_cfg, reference_llama, tool

PROMPT = [5, 17, 99, 3, 64, 2]


def _tp2_worker(rank: int, world: int, ckpt: str) -> dict:
    import deepspeed

    from megatron_core import parallel_state
    from megatron_core.tensor_parallel import gather_from_tensor_model_parallel_region
    from neox.checkpoint import local
    from neox.generation import SamplingParams, generate_tokens, load_weights
    from neox.model import GPTModel

    parallel_state.initialize_model_parallel(2, 1)
    cfg = dataclasses.replace(model_cfg(), padded_vocab_size=2 * VOCAB)
    model = GPTModel(cfg).eval()
    load_weights(model, ckpt, cfg)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        out["logits"] = gather_from_tensor_model_parallel_region(model(ids))[..., :VOCAB]
    for cache in (True, False):
        params = SamplingParams(maximum_tokens=10, vocab_size=VOCAB, use_cache=cache)
        out[f"greedy_{cache}"] = generate_tokens(model, PROMPT, params)
        sampled = SamplingParams(maximum_tokens=6, temperature=1.0, top_p=0.9, vocab_size=VOCAB, use_cache=cache)
        out[f"sampled_{cache}"] = generate_tokens(model, PROMPT, sampled, torch.Generator().manual_seed(rank))

    fresh = GPTModel(cfg, seed=99)
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-4)
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "zero_optimization": {"stage": 0},
          "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=fresh, optimizer=opt, config=ds, mpu=parallel_state,
                                           dist_init_required=False)
    local.load(engine, str(ckpt), "global_step0", module_only=True)
    mine = model.state_dict()
    out["deepspeed_load_equal"] = all(torch.equal(t, mine[n]) for n, t in engine.module.state_dict().items())
    parallel_state.destroy_model_parallel()
    return out


def test_tp2_logits_generation_and_deepspeed_load(tmp_path):
    make_meta_checkpoint(tmp_path / "meta", 2, seed=5)
    tool("convert_raw_llama_weights_to_neox").convert(tmp_path / "meta", model_cfg(), tmp_path / "ckpt", 2,
                                                      progress=False)
    ref = reference_llama(tmp_path / "meta")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        greedy = ref.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(PROMPT):].tolist()
    results = run_distributed(_tp2_worker, 2, str(tmp_path / "ckpt"))
    for r in results:
        assert (r["logits"] - want).abs().max().item() < 1e-5
        assert r["greedy_True"] == greedy and r["greedy_False"] == greedy
        assert r["sampled_True"] == r["sampled_False"]
        assert r["deepspeed_load_equal"]
    # the ranks seeded their samplers differently; the broadcast from TP rank 0 keeps them in step
    assert results[0]["sampled_True"] == results[1]["sampled_True"]
