"""The static decode path a CUDA graph captures (KV cache static mode + neox/model/decode_graph.py), run
eagerly on the CPU, against the dynamic cache path eager decoding uses (itself checked against
transformers in test_model.py / test_eval_reference.py): the same logits step after step for a
left-padded GQA batch (with and without a sliding window), the same greedy and sampled tokens through
NeoXLM and generate_tokens, and a mask that is the dynamic one written out over the whole cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neox.generation import SamplingParams, generate_tokens
from neox.model import GPTModel
from neox.model import decode_graph as dg
from neox.model.kv_cache import KVCache
from tests.unit.test_model import V, _randomise, llama_cfg


def _model(window: int | None = None, scale: float = 1.0) -> GPTModel:
    """``scale`` > 1: a large init, clear argmax choices (and logits large enough that fp32 rounding shows)."""
    torch.manual_seed(0)
    model = GPTModel(llama_cfg(sliding_window_width=window, max_position_embeddings=64, seq_length=64)).eval()
    _randomise(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _prompt_cache(model: GPTModel, ids: torch.Tensor, pad: torch.Tensor, length: int) -> tuple[KVCache, torch.Tensor]:
    b, width = ids.shape
    cache = model.allocate_kv_cache(b, length)
    cache.key_mask = torch.arange(length)[None, :] >= pad[:, None]
    positions = (torch.arange(width)[None, :] - pad[:, None]).clamp(min=0)
    return cache, model(ids, position_ids=positions, kv_cache=cache, last_only=True)


@pytest.mark.parametrize("window", [None, 3])
def test_static_decode_logits_equal_dynamic_over_many_steps(window):
    model = _model(window)
    b, width, steps = 3, 8, 20
    pad = torch.tensor([0, 2, 5])
    ids = torch.randint(1, V, (b, width), generator=torch.Generator().manual_seed(1))
    ids[torch.arange(width)[None, :] < pad[:, None]] = 0
    with torch.no_grad():
        dynamic, first = _prompt_cache(model, ids, pad, width + steps)
        static, first_s = _prompt_cache(model, ids, pad, width + steps)
        graph = dg.DecodeGraph(model, static, capture=False)
        assert graph.graph is None and static.position.tolist() == [width]
        tok = tok_s = first[:, -1].argmax(-1)
        assert torch.equal(tok, first_s[:, -1].argmax(-1))
        for step in range(steps):
            pos = (width + step - pad).view(b, 1)
            ref = model(tok.view(b, 1), position_ids=pos, kv_cache=dynamic)
            got = graph.step(tok_s.view(b, 1), pos)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            tok, tok_s = ref[:, -1].argmax(-1), got[:, -1].argmax(-1)
            assert torch.equal(tok, tok_s)
        assert static.position.tolist() == [width + steps] and static.seen == width and dynamic.seen == width + steps
        for layer in range(len(model.layers)):  # every slot written where the dynamic cache wrote it
            torch.testing.assert_close(static.keys[layer], dynamic.keys[layer], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="past it"):
            graph.step(tok_s.view(b, 1))
        graph.close()


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("padded", [True, False])
def test_static_mask_is_the_dynamic_rule_over_the_whole_cache(window, padded):
    b, length, seen = 3, 13, 9
    pads = [0, 1, 4]
    cache = KVCache.allocate(1, b, length, 2, 4)
    if padded:
        cache.key_mask = torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]
    cache.seen = seen
    cache.start_static()
    # hand-written: the query at slot `seen` sees slot j when j <= seen, j within the window, j not padding
    ref = torch.zeros(b if padded else 1, 1, 1, length, dtype=torch.bool)
    for r in range(ref.shape[0]):
        for j in range(length):
            ref[r, 0, 0, j] = j <= seen and (window is None or seen - j <= window) and (not padded or j >= pads[r])
    assert torch.equal(cache.attn_mask(1, window), ref)
    add = cache.attn_mask(1, window, torch.float32)
    assert add.stride(-2) % 8 == 0 and torch.equal(add, torch.zeros_like(add).masked_fill(~ref, float("-inf")))
    if padded:  # the dynamic mask is its first seen + 1 slots
        dyn = KVCache.allocate(1, b, length, 2, 4)
        dyn.key_mask, dyn.seen = cache.key_mask, seen
        assert torch.equal(dyn.attn_mask(1, window), ref[..., :seen + 1])
    k = torch.ones(b, 2, 1, 4)
    keys, _ = cache.update(0, k, k)  # a step: written at the slot, the whole buffer back
    assert keys.shape[2] == length and torch.equal(keys[:, :, seen], k[:, :, 0]) and not keys[:, :, seen + 1:].any()
    cache.advance()  # the next forward gets a new mask, one slot further
    nxt = cache.attn_mask(1, window)
    assert cache.position.tolist() == [seen + 1] and nxt[..., seen + 1].all() and not nxt[..., seen + 2:].any()


@pytest.fixture
def counted(monkeypatch):
    """Take the static path on the CPU (graph_safe says yes; capture is CUDA only) and count its steps."""
    steps = []

    class Counted(dg.DecodeGraph):
        def step(self, tokens, positions=None):
            steps.append(tokens.shape[0])
            return super().step(tokens, positions)

    import neox.eval.lm
    import neox.generation

    for mod in (neox.eval.lm, neox.generation):
        monkeypatch.setattr(mod, "graph_safe", lambda model: True)
        monkeypatch.setattr(mod, "DecodeGraph", Counted)
    return steps


def test_neoxlm_static_decode_equals_eager(counted):
    pytest.importorskip("lm_eval")
    from neox.config import NeoXArgs
    from neox.eval.lm import NeoXLM
    from neox.tokenizer.build import build_tokenizer
    from tests.unit import eval_helpers as H
    from tests.unit.test_eval_reference import PROMPTS

    args = NeoXArgs.from_flat(H.model_flat(sliding_window_width=6), world_size=1)
    torch.manual_seed(0)
    model = GPTModel(args.model, seed=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    tok = build_tokenizer(args.tokenizer)
    prompts = [NeoXLM(model, tok).tok_encode(p) for p in PROMPTS[:5]]
    greedy = SamplingParams(temperature=0.0, vocab_size=tok.vocab_size)
    sampled = dataclasses.replace(greedy, temperature=0.9, top_p=0.95)
    for params, n in ((greedy, 20), (sampled, 9)):  # 20: past STOP_CHECK_EVERY
        on = NeoXLM(model, tok, seed=3).generate_batch(prompts, [], n, params)
        assert len(counted) == n - 1 and set(counted) == {5}  # every decode step went through the static path
        off = NeoXLM(model, tok, seed=3, cuda_graphs=False).generate_batch(prompts, [], n, params)
        assert len(counted) == n - 1
        assert on == off and any(len(o) > 1 for o in on)
        counted.clear()


def test_generate_tokens_static_decode_equals_eager(counted):
    model = _model(window=4, scale=4.0)
    params = SamplingParams(maximum_tokens=14, vocab_size=V)
    prompt = [5, 17, 33, 3, 64, 2]
    on = generate_tokens(model, prompt, params)
    assert len(counted) == len(on) - 1 == 13
    assert on == generate_tokens(model, prompt, dataclasses.replace(params, cuda_graphs=False))
    assert len(counted) == 13


def test_graph_safe_only_on_cuda_for_plain_modules():
    model = _model()
    assert not dg.graph_safe(model)  # CPU parameters
    assert not dg.graph_safe(model.train())
    assert not any(dg._not_plain(m) for m in model.modules())  # a plain GPTModel: nothing refuses capture
    mlp = model.layers[0].mlp
    mlp.linear1.linear_fn = torch.nn.functional.linear  # as FP8 training swaps it
    handle = model.layers[1].register_forward_pre_hook(lambda mod, args: None)  # as DeepSpeed ZeRO-3 adds
    assert dg._not_plain(mlp.linear1) and dg._not_plain(model.layers[1])
    handle.remove()
    del mlp.linear1.linear_fn
    assert not any(dg._not_plain(m) for m in model.modules())
