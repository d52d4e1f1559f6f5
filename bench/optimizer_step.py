"""The optimizer step alone on a model's parameter shapes (fp32 weights and Adam state).

    python bench/optimizer_step.py [--model tinyllama|llemma7b] [--layers N] [--grad-dtype fp32|bf16]
        [--iters 20] [--norms-only]

Times, per step (CUDA events, median): the gradient norm neox's clipping takes (one ``_foreach_norm``,
fp32 sums of ``--grad-dtype`` gradients), against one ``linalg.vector_norm`` per gradient and a
compiled norm; PyTorch's fused AdamW over neox's two parameter groups, with and without the clip
coefficient passed as ``grad_scale``; the foreach (unfused) AdamW; and the memory-traffic floor of a
fused step (bytes moved / the copy bandwidth measured here on a tensor of the same total size).
``--accumulate TOKENS`` also times one micro-batch's weight-gradient GEMMs (bf16, TOKENS rows) followed by
the accumulation into bf16 gradients (``add_``, as autograd accumulates) against the same GEMMs
accumulating in place (``addmm_``, beta 1: what fusing the accumulation into the GEMM would save).
``--norms-only`` skips the optimizers (the 7B Adam state needs ~80 GB), as bf16 gradients do (the
optimizers here step fp32 weights with fp32 gradients).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

MODELS = {  # hidden, MLP inner size, k/v width, vocabulary, layers
    "tinyllama": dict(h=2048, ffn=5632, kv=256, vocab=32000, layers=22),
    "llemma7b": dict(h=4096, ffn=11008, kv=4096, vocab=32016, layers=32),
}


def shapes(layers: int, h: int = 2048, ffn: int = 5632, kv: int = 256, vocab: int = 32000) -> list[tuple[int, ...]]:
    per_layer = [(h + 2 * kv, h), (h, h), (2 * ffn, h), (h, ffn), (h,), (h,)]
    return [(vocab, h)] + per_layer * layers + [(h,), (vocab, h)]


def timed(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def accumulation(params: list[torch.Tensor], tokens: int, iters: int) -> dict[str, float]:
    """ms per micro-batch over every 2-D weight but the embedding and output layer: wgrad then ``add_``
    against in-place ``addmm_``."""
    weights = [q for q in params[1:-1] if q.ndim == 2]
    dev, bf16 = weights[0].device, torch.bfloat16
    dys = {w.shape[0]: torch.randn(tokens, w.shape[0], device=dev, dtype=bf16) for w in weights}
    xs = {w.shape[1]: torch.randn(tokens, w.shape[1], device=dev, dtype=bf16) for w in weights}
    accs = [torch.zeros(w.shape, device=dev, dtype=bf16) for w in weights]

    def separate():
        for w, acc in zip(weights, accs):
            acc.add_(dys[w.shape[0]].t() @ xs[w.shape[1]])

    def fused():
        for w, acc in zip(weights, accs):
            acc.addmm_(dys[w.shape[0]].t(), xs[w.shape[1]])

    return {"wgrad_then_add_ms": round(timed(separate, iters), 2), "wgrad_addmm_ms": round(timed(fused, iters), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="tinyllama")
    p.add_argument("--layers", type=int, default=None, help="default: the model's")
    p.add_argument("--grad-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--norms-only", action="store_true")
    p.add_argument("--accumulate", type=int, default=0, metavar="TOKENS")
    args = p.parse_args()
    dev = torch.device("cuda")
    dims = dict(MODELS[args.model])
    default_layers = dims.pop("layers")
    layers = args.layers or default_layers
    gdtype = torch.float32 if args.grad_dtype == "fp32" else torch.bfloat16
    params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes(layers, **dims)]
    grads = [(torch.randn_like(q) * 1e-3).to(gdtype) for q in params]
    if gdtype == torch.float32:
        for q, g in zip(params, grads):
            q.grad = g
    n = sum(q.numel() for q in params)
    groups = [{"params": [q for q in params if q.ndim == 2], "weight_decay": 0.1},
              {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}]
    out: dict[str, float] = {"params_millions": round(n / 1e6, 1)}

    big = torch.empty(n, device=dev)
    copy_ms = timed(lambda: big.mul_(1.0), args.iters)
    gbps = 2 * 4 * n / copy_ms / 1e6
    out["inplace_scale_ms (read+write 4B/param)"] = round(copy_ms, 2)
    out["bandwidth_GBps"] = round(gbps)
    # fused AdamW: reads param, grad, m, v; writes param, m, v (and grad when grad_scale is given)
    out["fused_adamw_floor_ms"] = round(7 * 4 * n / gbps / 1e6, 2)
    norms = {  # each: the per-gradient fp32 norms
        "foreach_norm_ms": lambda gs: torch._foreach_norm(gs, 2, dtype=torch.float32),
        "per_tensor_norm_ms": lambda gs: [torch.linalg.vector_norm(g, dtype=torch.float32) for g in gs],
        "compiled_norm_ms": torch.compile(lambda gs: [torch.linalg.vector_norm(g, dtype=torch.float32) for g in gs]),
    }
    reference = torch.stack([g.double().norm() for g in grads]).square().sum().sqrt()  # fp64, one tensor at a time
    for name, fn in norms.items():
        total = torch.stack(list(fn(grads))).square().sum().sqrt()
        out[name] = round(timed(lambda fn=fn: fn(grads), args.iters), 2)
        out[name.replace("_ms", "_rel_diff")] = float(((total - reference).abs() / reference).item())
    if args.accumulate:
        out |= accumulation(params, args.accumulate, args.iters)
    out["grad_read_floor_ms"] = round(grads[0].element_size() * n / gbps / 1e6, 2)  # one read of every gradient
    if args.norms_only or gdtype != torch.float32:
        print(json.dumps(out), flush=True)
        return
    for name, kw in (("fused_adamw_ms", {"fused": True}), ("foreach_adamw_ms", {"foreach": True})):
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), **kw)
        opt.step()  # state allocated outside the timing
        out[name] = round(timed(opt.step, args.iters), 2)
        if kw.get("fused"):
            opt.grad_scale = torch.tensor(1.0, device=dev)
            out["fused_adamw_grad_scale_ms"] = round(timed(opt.step, args.iters), 2)
            del opt.grad_scale
        del opt
        torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
