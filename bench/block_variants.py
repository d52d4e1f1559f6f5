"""One TinyLlama-shape transformer block, forward + backward, as training runs it: fp32 weights under
bf16 autocast, bf16 residual input, torch.compile. Compares compile settings and attention layouts.

    python bench/block_variants.py [--variants base,cdt,bhsd,autotune] [--profile]

Variants: ``base`` (neox as configured); ``cdt`` (Inductor's coordinate-descent tuning of its
kernels' launch configs); ``bhsd`` (q/k/v made contiguous in SDPA's [b, heads, s, d] layout before
attention, so its gradients come back in that layout); ``autotune`` (mode max-autotune-no-cudagraphs:
Triton GEMM templates tried against cuBLAS). Prints fwd+bwd ms per block and, with ``--profile``,
the five costliest kernels of each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _bhsd_attend(self, q, k, v, dropout, kv_cache):
    from neox.model.attention import _sdpa

    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return _sdpa(q, k, v, dropout).transpose(1, 2)


def run(variant: str, a: argparse.Namespace) -> dict:
    import torch._inductor.config as ind
    from triton.testing import do_bench

    from neox.config import NeoXArgs
    from neox.model import attention
    from neox.model.gpt import rotary_for
    from neox.model.init import ModelInit
    from neox.model.transformer import TransformerBlock

    torch._dynamo.reset()
    ind.coordinate_descent_tuning = variant == "cdt"
    original = attention.Attention._attend
    if variant == "bhsd":
        attention.Attention._attend = _bhsd_attend
    try:
        cfg = NeoXArgs.from_ymls([str(ROOT / "configs" / "tinyllama_1b.yml")]).model
        block = TransformerBlock(cfg, 0, ModelInit(cfg, 1234), device="cuda", dtype=torch.float32)
        x = torch.randn(a.batch, a.seq, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(a.seq, device="cuda").unsqueeze(0).expand(a.batch, a.seq)
        rot = rotary_for(cfg, pos)
        mode = "max-autotune-no-cudagraphs" if variant == "autotune" else None
        fn = torch.compile(block, mode=mode)

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                out = fn(x, rot)
            out.backward(torch.ones_like(out))

        step()
        ms = do_bench(step, warmup=100, rep=500, return_mode="median")
        row = {"variant": variant, "fwd_bwd_ms": round(ms, 3)}
        if a.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            ev = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
            ev.sort(key=lambda e: -e.self_device_time_total)
            row["top_kernels_us"] = {e.key[:70]: round(e.self_device_time_total / 3) for e in ev[:6]}
        return row
    finally:
        attention.Attention._attend = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="base,cdt,bhsd")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name()}), flush=True)
    for v in a.variants.split(","):
        try:
            print(json.dumps(run(v, a)), flush=True)
        except Exception as e:  # one failing variant must not hide the others
            print(json.dumps({"variant": v, "error": repr(e)[:300]}), flush=True)


if __name__ == "__main__":
    main()
