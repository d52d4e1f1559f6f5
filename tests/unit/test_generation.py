"""Text generation vs transformers' greedy ``generate``; KV cache vs recompute; sampling filters; modes."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch

from neox.generation import Generator, SamplingParams, filter_logits, generate_tokens, load_weights, run_mode
from tests.unit.test_convert_meta import VOCAB, make_meta_checkpoint, model_cfg, reference_llama, tool


class ByteTokenizer:
    """ASCII characters as token ids; id 0 is the EOD token."""

    vocab_size = VOCAB
    eod = 0

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % VOCAB or 1 for c in text]

    def detokenize(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(neox GPTModel loaded through the Meta converter + checkpoint reader, reference LlamaForCausalLM)."""
    from neox.model import GPTModel

    root = tmp_path_factory.mktemp("gen")
    make_meta_checkpoint(root / "meta", 2, seed=7)
    cfg = model_cfg()
    tool("convert_raw_llama_weights_to_neox").convert(root / "meta", cfg, root / "ckpt", 2, progress=False)
    cfg = dataclasses.replace(cfg, padded_vocab_size=VOCAB)  # the checkpoint holds 256 rows; extra rows are zero
    model = GPTModel(cfg).eval()
    with pytest.raises(Exception, match="does not fit"):
        load_weights(model, str(root / "ckpt"), cfg)
    cfg = dataclasses.replace(cfg, padded_vocab_size=2 * VOCAB)
    model = GPTModel(cfg).eval()
    assert load_weights(model, str(root / "ckpt"), cfg) == len(model.state_dict())
    return model, reference_llama(root / "meta")


def test_logits_match_transformers(models):
    model, ref = models
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (model(ids)[..., :VOCAB] - ref(ids).logits).abs().max().item()
    assert err < 1e-5


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_transformers_generate(models, use_cache):
    model, ref = models
    prompt = [5, 17, 99, 3, 64, 2]
    params = SamplingParams(maximum_tokens=12, temperature=0.0, eod=None, vocab_size=VOCAB, use_cache=use_cache)
    ours = generate_tokens(model, prompt, params)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


def test_stops_at_eod_and_cache_matches_recompute(models):
    model, _ = models
    prompt = [9, 8, 7, 6]
    free = generate_tokens(model, prompt, SamplingParams(maximum_tokens=10, vocab_size=VOCAB))
    eod = free[4]
    stopped = generate_tokens(model, prompt, SamplingParams(maximum_tokens=10, eod=eod, vocab_size=VOCAB))
    assert stopped == free[: free.index(eod) + 1]
    sampled = [generate_tokens(model, prompt, SamplingParams(maximum_tokens=8, temperature=0.9, top_k=20, top_p=0.9,
                                                             vocab_size=VOCAB, use_cache=c),
                               torch.Generator().manual_seed(3)) for c in (True, False)]
    assert sampled[0] == sampled[1] and all(0 < t < VOCAB for t in sampled[0])


def test_filters_against_hand_computed():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    top2 = filter_logits(logits, top_k=2)
    assert torch.equal(torch.isfinite(top2), torch.tensor([[False, True, True, False, False]]))
    p = torch.softmax(logits, -1)[0]  # sorted: 3.0 (0.636), 2.0 (0.234), 1.0 (0.086), ...
    assert p[1] < 0.7 < p[1] + p[2]
    top_p = filter_logits(logits, top_p=0.7)
    assert torch.equal(torch.isfinite(top_p), torch.tensor([[False, True, True, False, False]]))
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).sum() == 1


def test_modes_write_jsonl(models, tmp_path):
    model, ref = models
    gen = Generator(model, ByteTokenizer(), SamplingParams(maximum_tokens=5, eod=0, vocab_size=VOCAB))
    (tmp_path / "in.txt").write_text("hello\nworld\n\n")

    @dataclasses.dataclass
    class TG:
        text_gen_type: str
        sample_input_file: str = str(tmp_path / "in.txt")
        sample_output_file: str = str(tmp_path / "out.jsonl")
        num_samples: int = 2
        prompt_end: str = "\n"

    totals = run_mode(gen, TG("input-file"))
    recs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["context"] for r in recs] == ["hello", "world"] and totals["samples"] == 2
    with torch.no_grad():
        ids = ByteTokenizer().tokenize("hello")
        want = ref.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=0,
                            pad_token_id=0)[0, len(ids):].tolist()
    want = want[: want.index(0)] if 0 in want else want
    assert recs[0]["text"] == ByteTokenizer().detokenize(want)
    run_mode(gen, TG("unconditional"))
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    out = io.StringIO()
    totals = run_mode(gen, TG("interactive"), stdin=io.StringIO("hello\n\n"), stdout=out)
    assert totals["samples"] == 1 and recs[0]["text"] in out.getvalue()
    with pytest.raises(Exception, match="text_gen_type"):
        run_mode(gen, TG("bogus"))


@pytest.mark.gpu
def test_gpu_generation_matches_cpu_reference(models):
    """On CUDA: fp32 greedy equals transformers' greedy (on the same GPU); bf16 runs with and without cache."""
    model, ref = models
    gpu = type(model)(model.cfg, device="cuda").eval()
    gpu.load_state_dict(model.state_dict())
    ref_gpu = ref.to("cuda")
    prompt = [5, 17, 99, 3, 64, 2]
    params = SamplingParams(maximum_tokens=12, vocab_size=VOCAB)
    with torch.no_grad():
        theirs = ref_gpu.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert generate_tokens(gpu, prompt, params) == theirs
    assert generate_tokens(gpu, prompt, dataclasses.replace(params, use_cache=False)) == theirs
    half = type(model)(model.cfg, device="cuda", dtype=torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    for cache in (True, False):
        out = generate_tokens(half, prompt, dataclasses.replace(params, use_cache=cache, temperature=0.8, top_p=0.9),
                              torch.Generator().manual_seed(0))
        assert len(out) == 12 and all(0 <= t < VOCAB for t in out)
    ref.to("cpu")
