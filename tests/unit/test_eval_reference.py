"""NeoXLM against lm_eval's own HF backend on the tools/convert_neox_to_hf.py export of the same checkpoint.

The offline fixture tasks (tests/fixtures/eval_tasks: multiple choice, generative, rolling perplexity)
run through ``simple_evaluate`` with each model: per-request loglikelihoods agree within 1e-4 (CPU
fp32), greedy generations are the same strings, metrics the same. Hand-built requests check stop
sequences, max_gen_toks, batched against one-at-a-time greedy decoding, and seeded sampling.
"""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from tests.unit import eval_helpers as H  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lm_eval.models.huggingface import HFLM

    H.offline()
    root = tmp_path_factory.mktemp("eval_ref")
    ckpt, hf_dir = H.make_checkpoints(root)
    tasks = H.task_dir(root)
    hf = HFLM(pretrained=hf_dir, dtype="float32", device="cpu", batch_size=4)
    neox, _ = H.neox_lm(ckpt)
    return {"ckpt": ckpt, "hf": hf, "neox": neox, "hf_res": H.evaluate(hf, tasks), "neox_res": H.evaluate(neox, tasks)}


def _by_doc(res, task):
    return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def _lls(sample) -> list[float]:
    return [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in sample["resps"]]


@pytest.mark.parametrize("task", ["arith_mc", "arith_ppl"])
def test_loglikelihoods_match_hf_backend(world, task):
    ref, ours = _by_doc(world["hf_res"], task), _by_doc(world["neox_res"], task)
    assert len(ref) == len(ours) == 12
    for a, b in zip(ref, ours, strict=True):
        assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
        assert _lls(b) == pytest.approx(_lls(a), abs=TOL, rel=0)
        if task == "arith_mc":  # the is_greedy flags too
            assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]


def test_greedy_generations_match_hf_backend(world):
    ref, ours = _by_doc(world["hf_res"], "arith_gen"), _by_doc(world["neox_res"], "arith_gen")
    gens = [s["resps"] for s in ours]
    assert gens == [s["resps"] for s in ref]
    assert any(g[0][0].strip() for g in gens)  # not all empty: the comparison says something


def test_metrics_match_hf_backend(world):
    for task in H.TASKS:
        ref, ours = world["hf_res"]["results"][task], world["neox_res"]["results"][task]
        keys = [k for k, v in ref.items() if isinstance(v, float)]
        assert keys, task
        for k in keys:
            assert ours[k] == pytest.approx(ref[k], rel=1e-5), (task, k)


def _gen_requests(prompts, **kwargs):
    from lm_eval.api.instance import Instance

    return [Instance("generate_until", {}, (p, dict(kwargs)), idx=0) for p in prompts]


PROMPTS = ["Q: What is 3 plus 4?\nA:", "The sum of 2 and", "Q: 9 plus 9?", "7 plus 5 is 12. The sum of 7 and 5 is",
           "Numbers:", "Q: What is 1 plus 1?\nA: 2\nQ: What is 6 plus 2?\nA:"]


def test_batched_generation_equals_one_at_a_time_greedy(world):
    from neox.generation import SamplingParams, generate_tokens

    lm = world["neox"]
    prompts = [lm.tok_encode(p) for p in PROMPTS]  # different lengths: left padding in one batch
    batched = lm.generate_batch(prompts, [], 10, SamplingParams(temperature=0.0, vocab_size=lm.vocab_size))
    for p, got in zip(prompts, batched, strict=True):
        one = generate_tokens(lm.model, p, SamplingParams(maximum_tokens=10, vocab_size=lm.vocab_size,
                                                          eod=lm.eot_token_id))
        assert got == [t for t in one if t != lm.eot_token_id]
    reqs = _gen_requests(PROMPTS, until=["\n\n\n"], max_gen_toks=10, do_sample=False)
    lm._batch_size = 1
    try:
        single = lm.generate_until(reqs, disable_tqdm=True)
    finally:
        lm._batch_size = 4
    assert lm.generate_until(reqs, disable_tqdm=True) == single


def test_stop_sequences_and_max_gen_toks(world):
    lm, hf = world["neox"], world["hf"]
    free = lm.generate_until(_gen_requests(PROMPTS, until=["\n\n\n"], max_gen_toks=12), disable_tqdm=True)
    assert free == hf.generate_until(_gen_requests(PROMPTS, until=["\n\n\n"], max_gen_toks=12), disable_tqdm=True)
    # max_gen_toks: the first 3 tokens of the free answers, as the HF backend cuts them
    reqs = _gen_requests(PROMPTS, until=["\n\n\n"], max_gen_toks=3)
    short = lm.generate_until(reqs, disable_tqdm=True)
    assert short == hf.generate_until(reqs, disable_tqdm=True)
    assert all(f.startswith(s) for s, f in zip(short, free, strict=True)) and short != free
    # a stop string taken from the middle of an answer cuts the answer just before it
    text = max(free, key=len)
    i = PROMPTS.index(PROMPTS[free.index(text)])
    stop = text[len(text) // 2:len(text) // 2 + 2]
    got = lm.generate_until(_gen_requests([PROMPTS[i]], until=[stop], max_gen_toks=12), disable_tqdm=True)
    assert got == [text[:text.index(stop)]]
    assert got == hf.generate_until(_gen_requests([PROMPTS[i]], until=[stop], max_gen_toks=12), disable_tqdm=True)


def test_sampled_generation_is_seeded(world):
    from neox.eval.lm import NeoXLM

    lm = world["neox"]
    reqs = _gen_requests(PROMPTS, until=["\n\n\n"], max_gen_toks=8, do_sample=True, temperature=1.0, top_p=0.95)

    def run(seed):
        return NeoXLM(lm.model, lm.neox_tokenizer, batch_size=4, seed=seed).generate_until(reqs, disable_tqdm=True)

    first = run(3)
    assert len(first) == len(PROMPTS) and all(isinstance(t, str) for t in first)
    assert run(3) == first
    greedy = lm.generate_until(_gen_requests(PROMPTS, until=["\n\n\n"], max_gen_toks=8), disable_tqdm=True)
    assert first != greedy  # a large-init model at temperature 1 leaves its argmax somewhere


def test_batched_generation_with_sliding_window_equals_one_at_a_time():
    import torch

    from neox.config import NeoXArgs
    from neox.eval.lm import NeoXLM
    from neox.generation import SamplingParams, generate_tokens
    from neox.model import GPTModel
    from neox.tokenizer.build import build_tokenizer

    args = NeoXArgs.from_flat(H.model_flat(sliding_window_width=4), world_size=1)
    torch.manual_seed(0)
    model = GPTModel(args.model, seed=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # a large init: clear argmax choices
    lm = NeoXLM(model, build_tokenizer(args.tokenizer), batch_size=4)
    prompts = [lm.tok_encode(p) for p in PROMPTS[:4]]
    batched = lm.generate_batch(prompts, [], 8, SamplingParams(temperature=0.0, vocab_size=lm.vocab_size))
    for p, got in zip(prompts, batched, strict=True):
        one = generate_tokens(model, p, SamplingParams(maximum_tokens=8, vocab_size=lm.vocab_size, eod=lm.eot_token_id))
        assert got == [t for t in one if t != lm.eot_token_id]
