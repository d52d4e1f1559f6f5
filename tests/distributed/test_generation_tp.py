"""TP 2 on 2 gloo ranks: a converted Meta checkpoint gives transformers' logits and greedy tokens, and
DeepSpeed's ``load_checkpoint(load_module_only=True)`` (through neox.checkpoint.local) accepts it, in the
plain layout at TP 2 and in the pipeline layout at PP 2; a checkpoint pretrain() saves reads back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed.launch import run_distributed
from tests.unit.test_convert_meta import VOCAB, make_meta_checkpoint, model_cfg, reference_llama, tool

PROMPT = [5, 17, 99, 3, 64, 2]


def _tp2_worker(rank: int, world: int, ckpt: str, pipe_ckpt: str, tmp: str) -> dict:
    from megatron_core import parallel_state
    from megatron_core.tensor_parallel import gather_from_tensor_model_parallel_region
    from neox.checkpoint import local
    from neox.convert import weights
    from neox.generation import SamplingParams, generate_tokens, load_weights
    from neox.model import GPTModel
    from neox.training.engine import initialize

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
    engine = initialize(fresh, opt, ds, mpu=parallel_state)
    local.load(engine, str(ckpt), "global_step0", module_only=True)
    mine = model.state_dict()
    mine_full = dict(weights.read_full_weights(ckpt, cfg))
    out["deepspeed_load_equal"] = all(torch.equal(t, mine[n]) for n, t in engine.module.state_dict().items())
    parallel_state.destroy_model_parallel()
    out["pipe_load_equal"] = _pipe_load(pipe_ckpt, cfg, mine_full)
    out["trained"] = _read_trained(tmp)
    return out


def _read_trained(tmp: str) -> bool:
    """A checkpoint pretrain() saves at TP 2 (bf16, ZeRO-1) reads back as DeepSpeed itself loads it."""
    from megatron_core import parallel_state
    from neox.checkpoint import local
    from neox.config import NeoXArgs
    from neox.generation import load_weights
    from neox.model import GPTModel
    from neox.training.pretrain import build_engine, pretrain
    from tests.distributed.test_train_parity import make_corpus, tiny_flat

    prefix = make_corpus(Path(tmp)) if dist.get_rank() == 0 else str(Path(tmp) / "tiny_text_document")
    dist.barrier()
    flat = tiny_flat(prefix, train_iters=2, save=f"{tmp}/trained", checkpoint_factor=2, model_parallel_size=2,
                     bf16={"enabled": True}, zero_optimization={"stage": 1}, num_kv_heads=2)
    args = NeoXArgs.from_flat(flat, world_size=2)
    pretrain(args)
    ours = GPTModel(args.model)
    load_weights(ours, f"{tmp}/trained", args.model)
    engine, _ = build_engine(args, GPTModel(args.model, seed=7), torch.device("cpu"))
    local.load(engine, f"{tmp}/trained", "global_step2", module_only=True)
    theirs = engine.module.state_dict()
    ok = all(torch.equal(t, theirs[n].float()) for n, t in ours.state_dict().items())
    parallel_state.destroy_model_parallel()
    return ok


def _pipe_load(ckpt: str, cfg, full: dict) -> bool:
    """PP 2 x TP 1: DeepSpeed's PipelineEngine loads the layer_XX files write_weights wrote."""
    from megatron_core import parallel_state
    from neox.checkpoint import local
    from neox.model.pipe import GPTModelPipe
    from neox.training.engine import initialize, pipeline_topology

    parallel_state.initialize_model_parallel(1, 2)
    topo = pipeline_topology(pipe=2, tensor=1, data=1)
    model = GPTModelPipe(cfg, topology=topo, seed=99)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "zero_optimization": {"stage": 0},
          "steps_per_print": 10**9}
    engine = initialize(model, opt, ds)
    local.load(engine, ckpt, "global_step0", module_only=True)
    ok = all(torch.equal(p, full[n]) for n, p in engine.module.plain_named_parameters())
    parallel_state.destroy_model_parallel()
    return ok


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
    tool("reshard_checkpoint").reshard(tmp_path / "ckpt", model_cfg(padded_vocab_size=2 * VOCAB), tmp_path / "pipe",
                                       1, 2, progress=False)
    results = run_distributed(_tp2_worker, 2, str(tmp_path / "ckpt"), str(tmp_path / "pipe"), str(tmp_path))
    for r in results:
        assert (r["logits"] - want).abs().max().item() < 1e-5
        assert r["greedy_True"] == greedy and r["greedy_False"] == greedy
        assert r["sampled_True"] == r["sampled_False"]
        assert r["deepspeed_load_equal"] and r["pipe_load_equal"] and r["trained"]
    # the ranks seeded their samplers differently; the broadcast from TP rank 0 keeps them in step
    assert results[0]["sampled_True"] == results[1]["sampled_True"]
