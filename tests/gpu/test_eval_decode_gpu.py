"""Left-padded (masked) GQA attention through the KV cache on a GPU, the path batched evaluation decodes
with: CUDA's masked kernels take no GQA, so neox folds query heads (one new token) or copies k/v per
head (a prompt). Checked in fp32 and bf16 against SDPA's math kernel with ``enable_gqa`` on the
boolean mask, and that it does not run on the math kernel.

CUDA-graphed decode steps (neox/model/decode_graph.py) against eager decoding through the dynamic
cache: the same greedy tokens (and close logits) for a left-padded batch in fp32 and bf16, with and
without a sliding window; NeoXLM's and generate_tokens' results identical with cuda_graphs on and off,
and nothing of the graph left allocated after a batch."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from neox.model import decode_graph as dg
from neox.model.attention import masked_sdpa
from neox.model.kv_cache import KVCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("s", [1, 37])
def test_masked_gqa_matches_math_reference(dtype, tol, s):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, t = 3, 90
    q = torch.randn(b, 32, s, 64, device="cuda", generator=g)
    k, v = (torch.randn(b, 4, t, 64, device="cuda", generator=g) for _ in range(2))
    cache = KVCache.allocate(1, b, 128, 4, 64, device="cuda", dtype=dtype)
    cache.key_mask = torch.arange(128, device="cuda")[None, :] >= torch.tensor([0, 5, 30], device="cuda")[:, None]
    cache.seen = t - s
    boolean = cache.attn_mask(s)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=boolean, enable_gqa=True)
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        out = masked_sdpa(qd, kd, vd, cache.attn_mask(s, None, dtype)).float()  # no math fallback allowed
    assert (out - ref).abs().max().item() < tol


def _scaled(model):
    """A large init (all parameters times 8): clear argmax choices, so bf16 rounding cannot flip a token."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model.eval()


def _decode_model(dtype, window):
    from neox.model import GPTModel
    from tests.unit.test_model import llama_cfg

    torch.manual_seed(0)
    cfg = llama_cfg(hidden_size=256, num_attention_heads=8, num_kv_heads=2, intermediate_size=512, num_layers=3,
                    sliding_window_width=window, seq_length=128, max_position_embeddings=128)
    return _scaled(GPTModel(cfg, device="cuda", dtype=dtype))


def _prompt(model, ids, pad, length):
    b, width = ids.shape
    cache = model.allocate_kv_cache(b, length)
    cache.key_mask = torch.arange(length, device="cuda")[None, :] >= pad[:, None]
    positions = (torch.arange(width, device="cuda")[None, :] - pad[:, None]).clamp(min=0)
    return cache, model(ids, position_ids=positions, kv_cache=cache, last_only=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("window", [None, 5])
def test_graph_decode_equals_eager_decode(dtype, tol, window):
    from tests.unit.test_model import V

    model = _decode_model(dtype, window)
    assert dg.graph_safe(model)
    b, width, steps = 6, 20, 40
    pad = torch.tensor([0, 3, 7, 1, 12, 5], device="cuda")
    ids = torch.randint(1, V, (b, width), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    tokens = {"eager": [], "graph": []}
    with torch.no_grad():
        dynamic, first = _prompt(model, ids, pad, width + steps)
        static, _ = _prompt(model, ids, pad, width + steps)
        graph = dg.DecodeGraph(model, static)
        assert graph.graph is not None  # captured
        tok = tok_g = first[:, -1].argmax(-1)
        worst = 0.0
        for step in range(steps):
            pos = (width + step - pad).view(b, 1)
            ref = model(tok.view(b, 1), position_ids=pos, kv_cache=dynamic).float()
            got = graph.step(tok_g.view(b, 1), pos).float()
            worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
            tok, tok_g = ref[:, -1].argmax(-1), got[:, -1].argmax(-1)
            tokens["eager"].append(tok.tolist())
            tokens["graph"].append(tok_g.tolist())
        graph.close()
    assert tokens["graph"] == tokens["eager"]
    assert worst < tol
    assert static.position.tolist() == [width + steps]


def _counting(monkeypatch):
    import neox.eval.lm
    import neox.generation

    made = []

    class Counted(dg.DecodeGraph):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self.graph is not None)

    monkeypatch.setattr(neox.eval.lm, "DecodeGraph", Counted)
    monkeypatch.setattr(neox.generation, "DecodeGraph", Counted)
    return made


def test_neoxlm_results_identical_with_and_without_cuda_graphs(monkeypatch):
    pytest.importorskip("lm_eval")
    from neox.config import NeoXArgs
    from neox.eval.lm import NeoXLM
    from neox.generation import SamplingParams, generate_tokens
    from neox.model import GPTModel
    from neox.tokenizer.build import build_tokenizer
    from tests.unit import eval_helpers as H
    from tests.unit.test_eval_reference import PROMPTS, _gen_requests

    args = NeoXArgs.from_flat(H.model_flat(), world_size=1)
    torch.manual_seed(0)
    model = _scaled(GPTModel(args.model, seed=5, device="cuda", dtype=torch.bfloat16))
    tok = build_tokenizer(args.tokenizer)
    made = _counting(monkeypatch)
    greedy = _gen_requests(PROMPTS, until=["\n\n\n"], max_gen_toks=24)
    sampled = _gen_requests(PROMPTS, until=["\n\n\n"], max_gen_toks=12, do_sample=True, temperature=1.0, top_p=0.95)
    for reqs in (greedy, sampled):
        on = NeoXLM(model, tok, batch_size=4, seed=3).generate_until(reqs, disable_tqdm=True)
        assert made and all(made)  # each batch decoded through a captured graph
        made.clear()
        off = NeoXLM(model, tok, batch_size=4, seed=3, cuda_graphs=False).generate_until(reqs, disable_tqdm=True)
        assert not made and on == off and any(on)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    NeoXLM(model, tok, batch_size=4).generate_until(greedy, disable_tqdm=True)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # graph, pool tensors and cache all freed
    params = SamplingParams(maximum_tokens=16, vocab_size=tok.vocab_size)
    prompt = tok.tokenize(PROMPTS[0])
    made.clear()
    assert generate_tokens(model, prompt, params) == generate_tokens(model, prompt, dataclasses.replace(params, cuda_graphs=False))
    assert made and all(made)
