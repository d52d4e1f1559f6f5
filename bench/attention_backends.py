"""Attention backends and block compilation on one GPU: accuracy against fp32 math, and fwd+bwd time.

    python bench/attention_backends.py [--batch 4 --seq 4096 --heads 32 --kv-heads 4 --head-dim 64]

Prints one JSON line per variant (median ms of forward+backward, TFLOP/s on the causal half of the
attention FLOPs, relative error against an fp32 math reference on fresh random inputs), then the
same for one neox TransformerBlock of configs/tinyllama_1b.yml eager vs torch.compile (with its
dynamo graph-break count).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "default": None}
FA4 = "fa4"  # neox/model/flash.py's FlashAttention-4 ops (flash-attn-4 installed, Hopper/Blackwell)


def attend(q, k, v, backend, gqa_native):
    if backend == FA4:  # [b, h, s, d] views of [b, s, h, d] tensors, as neox's attention holds them
        from neox.model.flash import flash_attention

        return flash_attention(FA4, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, None).transpose(1, 2)
    if not gqa_native and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    kwargs = {"enable_gqa": True} if gqa_native else {}
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def check_and_time(name, backend, gqa_native, a):
    from triton.testing import do_bench

    torch.manual_seed(1)
    def shape(h, b=1, s=1024):  # [b, h, s, d] as a view of a [b, s, h, d] tensor (the model's layout)
        return torch.randn(b, s, h, a.head_dim, device="cuda").transpose(1, 2)

    q, k, v = (shape(h) for h in (a.heads, a.kv_heads, a.kv_heads))
    try:
        qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
        out = attend(qb, kb, vb, backend, gqa_native)
        out.backward(torch.ones_like(out))
        rep = a.heads // a.kv_heads
        ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(rep, 1),
                                             v.double().repeat_interleave(rep, 1), is_causal=True).float()
        err = rel_err(out, ref)
        q, k, v = (shape(h, a.batch, a.seq).bfloat16().detach().requires_grad_() for h in (a.heads, a.kv_heads, a.kv_heads))
        grad = shape(a.heads, a.batch, a.seq).bfloat16()

        def step():
            attend(q, k, v, backend, gqa_native).backward(grad)

        ms = do_bench(step, warmup=200, rep=1000, return_mode="median")
        flops = 4 * a.batch * a.heads * a.seq * a.seq * a.head_dim * 3.5 / 2  # fwd 2 GEMMs + bwd 5, causal half
        print(json.dumps({"variant": name, "rel_err_vs_fp64": round(err, 5), "fwd_bwd_ms": round(ms, 3),
                          "tflops": round(flops / ms / 1e9, 1)}), flush=True)
    except Exception as e:  # a backend may refuse a shape or GQA
        print(json.dumps({"variant": name, "error": repr(e)[:200]}), flush=True)


def fa4_host_cost(a):
    """CPU time of one FA4 call, its own interface against neox's direct kernel calls; no synchronisation
    inside the timed loop, so the GPU's queue absorbs the kernels and only the host's work is timed."""
    import time

    from neox.model.flash import _fa4_interface_bwd, _fa4_interface_fwd

    q, k, v, dout = (torch.randn(a.batch, a.seq, h, a.head_dim, device="cuda", dtype=torch.bfloat16)
                     for h in (a.heads, a.kv_heads, a.kv_heads, a.heads))
    scale = a.head_dim ** -0.5
    out, lse = torch.ops.neox.fa4_fwd(q, k, v, scale)
    variants = {"interface_fwd": lambda: _fa4_interface_fwd(q, k, v, scale),
                "direct_fwd": lambda: torch.ops.neox.fa4_fwd(q, k, v, scale),
                "interface_bwd": lambda: _fa4_interface_bwd(dout, q, k, v, out, lse, scale),
                "direct_bwd": lambda: torch.ops.neox.fa4_bwd(dout, q, k, v, out, lse, scale)}
    us = {}
    for name, fn in variants.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        us[f"{name}_us"] = round((time.perf_counter() - t0) / 20 * 1e6, 1)
        torch.cuda.synchronize()
    print(json.dumps({"variant": "fa4 host time per call", **us}), flush=True)


def block_compile(a):
    from triton.testing import do_bench

    from neox.config import NeoXArgs
    from neox.model.gpt import rotary_for
    from neox.model.init import ModelInit
    from neox.model.transformer import TransformerBlock

    args = NeoXArgs.from_ymls([str(Path(__file__).resolve().parent.parent / "configs" / "tinyllama_1b.yml")])
    cfg = args.model
    block = TransformerBlock(cfg, 0, ModelInit(cfg, 1234), device="cuda", dtype=torch.bfloat16)
    x = torch.randn(a.batch, a.seq, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(a.seq, device="cuda").unsqueeze(0).expand(a.batch, a.seq)
    rot = rotary_for(cfg, pos)
    ref = block(x, rot)
    explain = torch._dynamo.explain(block)(x, rot)
    compiled = torch.compile(block)
    out = compiled(x, rot)
    err = rel_err(out, ref.float())
    for name, fn in (("block_eager", block), ("block_compiled", compiled)):
        ms = do_bench(lambda fn=fn: fn(x, rot).sum().backward(), warmup=200, rep=1000, return_mode="median")
        print(json.dumps({"variant": name, "fwd_bwd_ms": round(ms, 3), "graph_breaks": explain.graph_break_count,
                          "rel_err_compiled_vs_eager": round(err, 5)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--skip-block", action="store_true")
    a = p.parse_args()
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "cudnn": torch.backends.cudnn.version()}), flush=True)
    for bname, backend in BACKENDS.items():
        for gqa_native in (False, True):
            check_and_time(f"{bname}{'+enable_gqa' if gqa_native else '+repeat_kv'}", backend, gqa_native, a)
    from neox.model.flash import flash_kernel

    if flash_kernel() == FA4:
        check_and_time("fa4 (neox custom ops, native GQA)", FA4, True, a)
        fa4_host_cost(a)
    if not a.skip_block:
        block_compile(a)


if __name__ == "__main__":
    main()
