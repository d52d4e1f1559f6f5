"""One transformer block, forward + backward, as training runs it: bf16 residual input, torch.compile,
and either fp32 weights under bf16 autocast (``--params fp32``, the committed TinyLlama config) or bf16
weights (``--params bf16``, the bf16-parameter / fp32-master fast path). Compares compile settings,
attention layouts and rewrites of the block's pointwise code, a few minutes for all on one GPU, before
any of them goes into a full training run.

    python bench/block_variants.py [--config configs/tinyllama_1b.yml] [--params fp32|bf16]
        [--batch 4] [--variants base,cdt,bhsd,autotune,flip,halves] [--profile]

Variants: ``base`` (neox as configured); ``cdt`` (Inductor's coordinate-descent tuning of its
kernels' launch configs); ``bhsd`` (q/k/v made contiguous in SDPA's [b, heads, s, d] layout before
attention, so its gradients come back in that layout); ``autotune`` (mode max-autotune-no-cudagraphs:
Triton GEMM templates tried against cuBLAS); ``flip`` (rotary's pair swap as a flip of the head's
halves, the sign in the sine table: session 12's lever, 24 ms a 7B step slower, kept as this screen's
control); ``halves`` (SwiGLU's backward writes its two halves into one buffer through ``as_strided``
views instead of a ``cat``). Prints fwd+bwd ms per block and, with ``--profile``, the six costliest
kernels of each.
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


def _flip_rotary(x, cos, sin):
    """``apply_rotary`` with the pair swap as a flip; ``sin`` has its first half negated (``_signed``)."""
    rot = cos.shape[-1]
    x_rot = x[..., :rot].float()
    swapped = x_rot.unflatten(-1, (2, rot // 2)).flip(-2).flatten(-2)
    out = x_rot * cos.unsqueeze(2) + swapped * sin.unsqueeze(2)
    return out.to(x.dtype) if rot == x.shape[-1] else torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)


def _signed(rot):
    cos, sin = rot
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class _SwiGLUHalves(torch.autograd.Function):
    """silu(gate) * up whose backward copies d(gate) and d(up) into the halves of one buffer through
    ``as_strided`` views, which Inductor lowers as stores into that buffer (on the CPU one half still
    passes through a temporary), where a ``cat`` is one kernel taking masked loads of every input for
    every element. Bitwise autograd's gradient."""

    @staticmethod
    def forward(ctx, y):
        gate, up = y.chunk(2, dim=-1)
        ctx.save_for_backward(y)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        gate, up = y.chunk(2, dim=-1)
        dy = torch.empty_like(y)  # contiguous, offset 0: each half is a strided view of it
        size, half = (*y.shape[:-1], y.shape[-1] // 2), y.shape[-1] // 2
        dy.as_strided(size, dy.stride(), 0).copy_(torch.ops.aten.silu_backward(g * up, gate))
        dy.as_strided(size, dy.stride(), half).copy_(g * torch.nn.functional.silu(gate))
        return dy


def _halves_mlp_forward(self, x):
    if not (self.gated and self.act is torch.nn.functional.silu):
        raise ValueError("the halves variant is for SwiGLU MLPs")
    return self.linear2(_SwiGLUHalves.apply(self.linear1(x)))


def run(variant: str, a: argparse.Namespace) -> dict:
    import torch._inductor.config as ind
    from triton.testing import do_bench

    from neox.config import NeoXArgs
    from neox.model import attention, mlp
    from neox.model.gpt import rotary_for
    from neox.model.init import ModelInit
    from neox.model.transformer import TransformerBlock

    torch._dynamo.reset()
    ind.coordinate_descent_tuning = variant == "cdt"
    originals = attention.Attention._attend, attention.apply_rotary, mlp.MLP.forward
    if variant == "bhsd":
        attention.Attention._attend = _bhsd_attend
    if variant == "flip":
        attention.apply_rotary = _flip_rotary
    if variant == "halves":
        mlp.MLP.forward = _halves_mlp_forward
    try:
        cfg = NeoXArgs.from_ymls([str(ROOT / a.config)]).model
        dtype = torch.float32 if a.params == "fp32" else torch.bfloat16
        block = TransformerBlock(cfg, 0, ModelInit(cfg, 1234), device="cuda", dtype=dtype)
        x = torch.randn(a.batch, a.seq, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(a.seq, device="cuda").unsqueeze(0).expand(a.batch, a.seq)
        rot = rotary_for(cfg, pos)
        if variant == "flip" and rot is not None:
            rot = _signed(rot)
        mode = "max-autotune-no-cudagraphs" if variant == "autotune" else None
        fn = torch.compile(block, mode=mode)

        def step():
            with torch.autocast("cuda", torch.bfloat16, enabled=a.params == "fp32"):
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
        attention.Attention._attend, attention.apply_rotary, mlp.MLP.forward = originals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="base,cdt,bhsd")
    p.add_argument("--config", default="configs/tinyllama_1b.yml", help="the model (relative to the repo)")
    p.add_argument("--params", choices=("fp32", "bf16"), default="fp32")
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
