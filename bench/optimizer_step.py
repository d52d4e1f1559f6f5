"""The optimizer step alone on the TinyLlama-1.1B parameter shapes (fp32 weights, gradients, Adam state).

    python bench/optimizer_step.py [--layers 22] [--iters 20]

Times, per step (CUDA events, median): the foreach gradient norm neox's clipping uses; PyTorch's
fused AdamW over neox's two parameter groups, with and without the clip coefficient passed as
``grad_scale``; the foreach (unfused) AdamW; and the memory-traffic floor of a fused step (bytes
moved / the copy bandwidth measured here on a tensor of the same total size).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    dev = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes(args.layers)]
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    n = sum(q.numel() for q in params)
    groups = [{"params": [q for q in params if q.ndim == 2], "weight_decay": 0.1},
              {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}]
    grads = [q.grad for q in params]
    out: dict[str, float] = {"params_millions": round(n / 1e6, 1)}

    big = torch.empty(n, device=dev)
    copy_ms = timed(lambda: big.mul_(1.0), args.iters)
    gbps = 2 * 4 * n / copy_ms / 1e6
    out["inplace_scale_ms (read+write 4B/param)"] = round(copy_ms, 2)
    out["bandwidth_GBps"] = round(gbps)
    # fused AdamW: reads param, grad, m, v; writes param, m, v (and grad when grad_scale is given)
    out["fused_adamw_floor_ms"] = round(7 * 4 * n / gbps / 1e6, 2)
    out["foreach_norm_ms"] = round(timed(lambda: torch._foreach_norm(grads), args.iters), 2)
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
