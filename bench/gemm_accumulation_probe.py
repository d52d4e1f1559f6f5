"""Does a compiled block take ``megatron_core.tensor_parallel.grad_accumulation``'s ``main_grad`` path?

    python bench/gemm_accumulation_probe.py      # GPU if visible, else CPU; under a minute

``MasterWeightAdamW(gemm_accumulation=True)`` parks the first micro-batch's gradients as
``weight.main_grad``; from then on each linear layer should add its weight gradient into that buffer
itself (``weight.grad`` stays None), which under torch.compile takes a second graph, traced with
``main_grad`` present. Prints, per micro-batch, whether every linear took the path and how many
graphs Dynamo has made, for the test suite's tiny model (compiled in place and wrapped) and for
neox's ``TransformerBlock`` compiled in place as ``neox.training.pretrain.compile_blocks`` does.
Measured (docs/performance.md, session 13): taken on torch 2.13 (CPU), not on torch 2.11 + CUDA.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]

from neox.training.master_weights import MasterWeightAdamW  # noqa: E402


def _probe(label: str, model: torch.nn.Module, run, batches, loss) -> None:
    torch._dynamo.reset()
    counters.clear()
    opt = MasterWeightAdamW(model.parameters(), lr=1e-3, gemm_accumulation=True)
    linears = [m for m in model.modules() if hasattr(m, "linear_fn")]
    for i, b in enumerate(batches):
        loss(run(model), b).backward()
        taken = all(m.weight.grad is None for m in linears) if i > 0 else "-"
        opt.accumulate(i == len(batches) - 1)
        print(f"{torch.__version__} {label}: micro-batch {i}, {len(linears)} linears, main_grad path taken: "
              f"{taken}, graphs: {counters['stats']['unique_graphs']}", flush=True)


def main() -> None:
    from test_grad_accumulation import _batches, _loss, _Tiny

    from neox.config import NeoXArgs
    from neox.model.gpt import rotary_for
    from neox.model.init import ModelInit
    from neox.model.transformer import TransformerBlock

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ids = [b.to(dev) for b in _batches(3)]
    tiny = _Tiny().to(dev)
    tiny.compile()
    _probe("tiny model, Module.compile()", tiny, lambda m: m, ids, _loss)
    wrapped = torch.compile(_Tiny().to(dev))
    _probe("tiny model, torch.compile(model)", wrapped._orig_mod, lambda m: wrapped, ids, _loss)

    cfg = NeoXArgs.from_ymls([str(ROOT / "configs" / "quickstart.yml")]).model
    block = TransformerBlock(cfg, 0, ModelInit(cfg, 1234), device=dev, dtype=torch.bfloat16)
    block.compile()
    seq = 128
    rot = rotary_for(cfg, torch.arange(seq, device=dev).unsqueeze(0).expand(2, seq))
    xs = [torch.randn(2, seq, cfg.hidden_size, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    _probe("TransformerBlock.compile()", block, lambda m: m, xs,
           lambda m, x: m(x.requires_grad_(), rot).float().square().mean())


if __name__ == "__main__":
    main()
