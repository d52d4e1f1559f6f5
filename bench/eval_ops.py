"""Host-side work of neox's lm-eval paths on the CPU: aten ops a decode step and a loglikelihood request.

    python bench/eval_ops.py [--layers 22]

A GPU decoding a batch of 1B-class rows is launch-bound, so the ops the host dispatches per step
(each one a kernel launch or more on CUDA) are what a CPU can measure of it. Counts top-level aten
ops under torch.profiler for ``NeoXLM.generate_batch`` (16 prompts of 100-200 tokens, greedy, the
difference between 33 and 1 new tokens over 32) and ``NeoXLM.loglikelihood`` (bench/eval_throughput.py's
synthetic multiple-choice requests, batch 16), on a random-init fp32 model of the quickstart
tokenizer's vocabulary. CPU-only SDPA internals are not counted; CUDA's masked-GQA math fallback,
which this run cannot show, was about 80 nested aten ops a layer a step before issue 21's pass.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def top_level_ops(fn) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args(argv)
    import torch

    from bench.eval_throughput import SHAPE, requests, synthetic_jsonl
    from neox.config import NeoXArgs
    from neox.eval.lm import NeoXLM
    from neox.generation import SamplingParams
    from neox.model import GPTModel
    from neox.tokenizer.build import build_tokenizer

    shape = {**SHAPE, "num_layers": a.layers, "hidden_size": 256, "num_attention_heads": 8, "num_kv_heads": 4,
             "intermediate_size": 704, "precision": "fp32"}
    args = NeoXArgs.from_flat(shape, world_size=1)
    torch.manual_seed(0)
    lm = NeoXLM(GPTModel(args.model).eval(), build_tokenizer(args.tokenizer), batch_size=16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 8000, (int(n),), generator=g).tolist() for n in torch.randint(100, 200, (16,), generator=g)]
    greedy = SamplingParams(temperature=0.0, vocab_size=lm.vocab_size)
    lm.generate_batch(prompts, ["<<never>>"], 2, greedy)  # warm-up
    one = top_level_ops(lambda: lm.generate_batch(prompts, ["<<never>>"], 1, greedy))
    many = top_level_ops(lambda: lm.generate_batch(prompts, ["<<never>>"], 33, greedy))
    work = Path(tempfile.mkdtemp(prefix="neox_eval_ops_"))
    synthetic_jsonl(work / "bench.jsonl", 16, 0, 160)
    ll, _ = requests(work / "bench.jsonl", 16, 0, 1)
    per_req = top_level_ops(lambda: lm.loglikelihood(ll, disable_tqdm=True)) / len(ll)
    print(f"{a.layers} layers: {(many - one) / 32:.1f} top-level aten ops a decode step (batch 16); "
          f"{per_req:.1f} a loglikelihood request (batch 16)")
    print(f"transformers' generate, same shape and prompts: {hf_ops_per_step(args.model, prompts):.1f} a decode step")
    return 0


def hf_ops_per_step(cfg: Any, prompts: list[list[int]]) -> float:
    """The same count for transformers' LlamaForCausalLM.generate (left padding, attention mask, greedy)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_kv_heads,
                       max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa")
    model = LlamaForCausalLM(conf).eval()
    width = max(len(x) for x in prompts)
    ids = torch.tensor([[0] * (width - len(x)) + x for x in prompts])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts])

    def gen(n: int) -> None:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)

    with torch.no_grad():
        gen(2)
        return (top_level_ops(lambda: gen(33)) - top_level_ops(lambda: gen(1))) / 32


if __name__ == "__main__":
    sys.exit(main())
