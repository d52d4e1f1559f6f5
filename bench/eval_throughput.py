"""lm-eval throughput on one GPU: neox's ``NeoXLM`` batched and unbatched against the harness's HF backend.

    python bench/eval_throughput.py            # from the repo root; results under $OUT (default ./out)

A 1B-class LLaMA of TinyLlama's shape (22 layers, hidden 2048, 32 heads, 4 KV heads, MLP 5632; the
quickstart SentencePiece tokenizer, so an 8192-entry vocabulary), random init in bf16, is written as
a Hugging Face folder, converted to a neox checkpoint (tools/convert_hf_to_neox.py) and exported back
(tools/convert_neox_to_hf.py): neox loads the checkpoint, the harness's ``hf`` backend the export, so
both run the same weights. The requests are the harness's own ``Instance`` objects built from a
synthetic jsonl written on the fly (multiple choice: 4 loglikelihood requests a question with a long
context; generative: greedy ``generate_until`` with a stop string that never occurs, so each request
decodes ``max_gen_toks`` unless it meets EOS), in the prompt format of tests/fixtures/eval_tasks.
Each backend's ``loglikelihood`` and ``generate_until`` are timed after a warm-up call; the figures are
requests/s, context tokens/s and generated tokens/s (tokens re-encoded from the returned text, the
same count for every backend). Unbatched runs a subset (rates are per second). "neox batched" decodes
with CUDA-graphed steps (NeoXLM's default, on a GPU), "neox batched, eager decode" with
``cuda_graphs=False`` (the same requests; its generations must be identical).

Imports only what the harness's LM classes need, not its task machinery (datasets, evaluate, ...):
besides torch, transformers and neox's own dependencies, lm_eval and accelerate (the HF backend), and
psutil for accelerate; jinja2 comes with torch. Wheels (``pip download --no-deps lm_eval==0.4.13
accelerate==1.15.0 psutil==7.2.2``): lm_eval-0.4.13-py3-none-any.whl, accelerate-1.15.0-py3-none-any.whl,
psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.manylinux_2_28_x86_64.whl, installed
with ``pip install --no-deps``. ``--tiny`` runs a 2-layer model on the CPU to check the script; ``--cpu``
a 4-layer hidden-256 fp32 model on the CPU (indicative figures for a change made without a GPU:
``python bench/eval_throughput.py --cpu --mc 64 --gen 32 --max-gen-toks 32 --batch-size 16 --repeat 3``).
Writes ``$OUT/eval_throughput.json`` and ``$OUT/eval_throughput.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKENIZER = ROOT / "datasets" / "quickstart" / "tokenizer.model"
VOCAB = 8192
SHAPE = {
    "num_layers": 22, "hidden_size": 2048, "num_attention_heads": 32, "num_kv_heads": 4, "intermediate_size": 5632,
    "seq_length": 2048, "max_position_embeddings": 2048, "norm": "rmsnorm", "rms_norm_epsilon": 1e-5,
    "pos_emb": "rotary", "rotary_emb_base": 10000.0, "mlp_type": "llama", "activation": "silu",
    "use_bias_in_norms": False, "use_bias_in_attn_linear": False, "use_bias_in_mlp": False, "no_weight_tying": True,
    "make_vocab_size_divisible_by": 128, "tokenizer_type": "SPMTokenizer", "vocab_file": str(TOKENIZER),
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "pipe_parallel_size": 0,
    "model_parallel_size": 1, "precision": "bfloat16",
}
TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2, "intermediate_size": 224}
# --cpu: a model small enough for a CPU to time in about a minute (indicative only: a GPU is launch-bound
# where a CPU is compute-bound), in fp32, as the CPU reference tests run
CPU = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "num_kv_heads": 4, "intermediate_size": 704,
       "precision": "fp32"}
NEVER = "<<never-stops>>"
WORDS = ("one two three four five six seven eight nine ten plus minus times equals sum product number answer "
         "the of and is what question total more less than").split()


def log(msg: str, fh: Any) -> None:
    print(msg, flush=True)
    fh.write(msg + "\n")
    fh.flush()


def check_imports() -> None:
    missing = []
    for mod in ("lm_eval", "jinja2", "accelerate", "psutil", "transformers"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise SystemExit(f"eval_throughput: missing {missing}; pip install --no-deps lm_eval==0.4.13 "
                         "accelerate==1.15.0 psutil==7.2.2")


def synthetic_jsonl(path: Path, n_mc: int, n_gen: int, ctx_words: int, seed: int = 0) -> None:
    """Questions with long contexts (math-flavoured word salad) and four numeric choices."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(max(n_mc, n_gen)):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            story = " ".join(rng.choice(WORDS) for _ in range(rng.randint(ctx_words // 2, ctx_words)))
            choices = [str(a + b + d) for d in rng.sample(range(-3, 4), 4)]
            f.write(json.dumps({"question": f"{story}. What is {a} plus {b}?", "choices": choices,
                                "answer": str(a + b), "id": i}) + "\n")


def requests(path: Path, n_mc: int, n_gen: int, max_gen: int) -> tuple[list[Any], list[Any]]:
    """The harness's Instances, as arith_mc/arith_gen (tests/fixtures/eval_tasks) would build them."""
    from lm_eval.api.instance import Instance

    docs = [json.loads(line) for line in open(path, encoding="utf-8")]
    ll, gen = [], []
    for d in docs[:n_mc]:
        ctx = f"Question: {d['question']}\nAnswer:"
        ll += [Instance("loglikelihood", d, (ctx, f" {c}"), idx=j) for j, c in enumerate(d["choices"])]
    kwargs = {"until": [NEVER], "max_gen_toks": max_gen, "do_sample": False}
    for d in docs[:n_gen]:
        gen.append(Instance("generate_until", d, (f"Q: {d['question']}\nA:", dict(kwargs)), idx=0))
    return ll, gen


def make_weights(work: Path, cfg: Any, tok_cfg: Any, device: str, fp32: bool = False) -> tuple[Path, Path]:
    """Random TinyLlama-shape weights -> HF folder -> neox checkpoint -> HF export (bf16 unless ``fp32``)."""
    import torch

    dtype = torch.float32 if fp32 else torch.bfloat16
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=VOCAB, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(conf).to(dtype)
    model.save_pretrained(work / "hf_src")
    del model
    tool("convert_hf_to_neox").convert(work / "hf_src", cfg, work / "ckpt", 1, dtype=dtype, progress=False)
    shutil.rmtree(work / "hf_src")
    tool("convert_neox_to_hf").convert(work / "ckpt", cfg, work / "hf", precision="fp32" if fp32 else "bf16", vocab_size=VOCAB,
                                       tokenizer=tok_cfg)
    return work / "ckpt", work / "hf"


def tool(name: str) -> Any:
    """tools/<name>.py (tools/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(lm: Any, method: str, reqs: list[Any], repeat: int = 1) -> tuple[float, list[Any]]:
    """Seconds of the fastest of ``repeat`` calls (a shared CPU's load comes and goes), and its answers."""
    getattr(lm, method)(reqs[: min(len(reqs), 4)], disable_tqdm=True)  # warm-up: kernels, allocator
    best = float("inf")
    for _ in range(repeat):
        _sync()
        t = time.perf_counter()
        out = getattr(lm, method)(reqs, disable_tqdm=True)
        _sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def measure(name: str, lm: Any, ll: list[Any], gen: list[Any], count_tokens: Any, fh: Any,
            repeat: int = 1) -> dict[str, Any]:
    ctx_tokens = sum(len(count_tokens(r.args[0] + r.args[1])) for r in ll)
    ll_s, ll_out = timed(lm, "loglikelihood", ll, repeat)
    gen_s, gen_out = timed(lm, "generate_until", gen, repeat)
    gen_tokens = sum(len(count_tokens(t)) for t in gen_out)
    rec = {"backend": name, "batch_size": lm.batch_size, "ll_requests": len(ll), "ll_seconds": ll_s,
           "ll_requests_per_s": len(ll) / ll_s, "ll_tokens_per_s": ctx_tokens / ll_s,
           "gen_requests": len(gen), "gen_seconds": gen_s, "gen_tokens": gen_tokens,
           "gen_tokens_per_s": gen_tokens / gen_s, "ll": [x[0] for x in ll_out], "gen": gen_out}
    log(f"{name:<26} bs {rec['batch_size']:>3} | loglikelihood {rec['ll_requests_per_s']:8.1f} req/s "
        f"({rec['ll_tokens_per_s']:9.0f} tok/s, {len(ll)} req) | generate {rec['gen_tokens_per_s']:8.1f} tok/s "
        f"({gen_tokens} tok, {len(gen)} req)", fh)
    return rec


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How close two backends' answers are on the requests both ran (bf16: close, not equal)."""
    n, m = min(len(a["ll"]), len(b["ll"])), min(len(a["gen"]), len(b["gen"]))
    diffs = [abs(x - y) for x, y in zip(a["ll"][:n], b["ll"][:n], strict=True)]
    same = sum(x == y for x, y in zip(a["gen"][:m], b["gen"][:m], strict=True))
    return {"pair": f"{a['backend']} vs {b['backend']}", "ll_max_abs_diff": max(diffs, default=0.0),
            "ll_mean_abs_diff": sum(diffs) / max(len(diffs), 1), "gen_identical": f"{same}/{m}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mc", type=int, default=512, help="multiple-choice questions (4 loglikelihood requests each)")
    p.add_argument("--gen", type=int, default=256, help="generate_until requests")
    p.add_argument("--ctx-words", type=int, default=160, help="words in a question's context (up to)")
    p.add_argument("--max-gen-toks", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--unbatched-mc", type=int, default=64, help="questions the batch-size-1 run scores")
    p.add_argument("--unbatched-gen", type=int, default=8, help="generations the batch-size-1 run decodes")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: checks the script, no figures")
    p.add_argument("--cpu", action="store_true", help="a 4-layer hidden-256 fp32 model on the CPU: indicative figures")
    p.add_argument("--repeat", type=int, default=1, help="time each call this many times, keep the fastest")
    a = p.parse_args(argv)
    check_imports()
    import torch

    from neox.config import NeoXArgs
    from neox.eval.lm import NeoXLM
    from neox.generation import load_weights
    from neox.model import GPTModel
    from neox.tokenizer.build import build_tokenizer

    out = Path(os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / "eval_throughput.log", "w", encoding="utf-8")
    work = Path(tempfile.mkdtemp(prefix="neox_eval_bench_"))
    try:
        shape = {**SHAPE, **(TINY if a.tiny else CPU if a.cpu else {})}
        device = "cpu" if a.tiny or a.cpu else "cuda"
        dtype = torch.float32 if a.cpu else torch.bfloat16
        args = NeoXArgs.from_flat(shape, world_size=1)
        t0 = time.perf_counter()
        ckpt, hf_dir = make_weights(work, args.model, args.tokenizer, device, fp32=a.cpu)
        log(f"weights: {time.perf_counter() - t0:.1f} s (HF random init -> neox checkpoint -> HF export)", fh)
        synthetic_jsonl(work / "bench.jsonl", a.mc, a.gen, a.ctx_words)
        ll, gen = requests(work / "bench.jsonl", a.mc, a.gen, a.max_gen_toks)
        tokenizer = build_tokenizer(args.tokenizer)
        model = GPTModel(args.model, device=device, dtype=dtype).eval()
        load_weights(model, str(ckpt), args.model)

        def count(text: str) -> list[int]:
            return list(tokenizer.tokenize(text)) if text else []

        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        log(f"device {name}, torch {torch.__version__}; {len(ll)} loglikelihood and "
            f"{len(gen)} generate_until requests, max_gen_toks {a.max_gen_toks}", fh)
        recs = [measure("neox batched", NeoXLM(model, tokenizer, batch_size=a.batch_size), ll, gen, count, fh,
                    a.repeat)]
        recs.append(measure("neox unbatched", NeoXLM(model, tokenizer, batch_size=1), ll[: 4 * a.unbatched_mc],
                            gen[: a.unbatched_gen], count, fh, a.repeat))
        # generation only: its loglikelihood path is the batched one's
        recs.append(measure("neox batched, eager decode", NeoXLM(model, tokenizer, batch_size=a.batch_size,
                                                                 cuda_graphs=False), ll[:4], gen, count, fh, a.repeat))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        from lm_eval.models.huggingface import HFLM

        hf = HFLM(pretrained=str(hf_dir), dtype="float32" if a.cpu else "bfloat16", device=device, batch_size=a.batch_size)
        recs.append(measure("lm_eval hf backend", hf, ll, gen, count, fh, a.repeat))
        batched, unbatched, eager, hf_rec = recs
        close = [compare(batched, hf_rec), compare(batched, unbatched), compare(batched, eager)]
        for c in close:
            log(f"{c['pair']}: loglikelihood max |diff| {c['ll_max_abs_diff']:.4f}, mean {c['ll_mean_abs_diff']:.4f}; "
                f"identical generations {c['gen_identical']}", fh)
        speed = {k: batched[k] / hf_rec[k] for k in ("ll_requests_per_s", "gen_tokens_per_s")}
        speed["gen_tokens_per_s_eager_decode"] = eager["gen_tokens_per_s"] / hf_rec["gen_tokens_per_s"]
        log(f"neox batched / hf backend: loglikelihood x{speed['ll_requests_per_s']:.2f}, "
            f"generation x{speed['gen_tokens_per_s']:.2f} (eager decode x{speed['gen_tokens_per_s_eager_decode']:.2f})", fh)
        summary = {"device": name, "torch": torch.__version__, "shape": shape,
                   "settings": vars(a), "speedup_vs_hf": speed, "agreement": close,
                   "runs": [{k: v for k, v in r.items() if k not in ("ll", "gen")} for r in recs],
                   "total_seconds": time.perf_counter() - t0}
        (out / "eval_throughput.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"-> {out / 'eval_throughput.json'} ({summary['total_seconds']:.0f} s in all)", fh)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        fh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
