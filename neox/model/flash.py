"""FlashAttention kernels for the ``flash`` attention backend, used when importable.

Two packages provide them, both optional and neither needing a CUDA compile on the user's side when
installed from wheels:
- FlashAttention-2 (``flash_attn``: ``flash_attn.flash_attn_func``), on any GPU it was built for;
- FlashAttention-4 (``flash-attn-4``: ``flash_attn.cute``, kernels written in CuTe DSL and compiled
  on first use), on Hopper and Blackwell (compute capability 9.x / 10.x). It is preferred there: it
  uses those chips' asynchronous matrix instructions, which FlashAttention-2 does not.

FlashAttention-4's entry point is a Python ``autograd.Function`` that compiles kernels on its first
call, which torch.compile cannot trace; here its forward and backward are two opaque custom ops with
shape-only fake kernels, so a compiled block stays one graph around them. Inside them, after a shape's
first call, neox calls FA4's compiled kernels itself (neox/model/kernel_replay.py). On the H200's
host that takes a forward from 93 to 36 µs of CPU and a backward from 113 to 99 µs (five kernel calls
at grouped heads); the FP8 TinyLlama step's GPU idle time went from 8.2 to 7.3 ms (session 10,
docs/performance.md). Anything a kernel lacks (dropout, a sliding window, fp32, a head size FA4 has
not run at) falls back to SDPA in the caller.

Measured on an H200 (session 9, docs/performance.md): FA4 4.0.0b36 against cuDNN's SDPA kernel,
forward and backward, 1.18x at head dim 64 and 1.13x at 128, and +3.6% on TinyLlama's training step;
tests/gpu/test_flash_gpu.py holds it against fp64 and SDPA there. scripts/install.sh installs it on
compute capability 9.x/10.x machines (Blackwell's kernels have not run here).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os

import torch
from torch import Tensor

from neox.model.kernel_replay import KernelReplay

FA2, FA4 = "fa2", "fa4"
log = logging.getLogger(__name__)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import
        return False


@functools.cache
def _fa4_imports() -> bool:
    """flash-attn-4 found but unusable (its CuTe DSL runtime missing, say) falls back, said once."""
    try:
        importlib.import_module("flash_attn.cute.interface")
        return True
    except Exception as err:  # noqa: BLE001 - any import failure means: do not use it
        log.warning("flash-attn-4 is installed but does not import (%s: %s); attention falls back",
                    type(err).__name__, err)
        return False


def flash_kernel() -> str | None:
    """The FlashAttention package to use on this machine's GPU: FA4 on compute capability 9.x/10.x
    when installed, else FA2 when installed, else None (SDPA)."""
    if not _has("flash_attn"):
        return None
    if (_has("flash_attn.cute") and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)
            and _fa4_imports()):
        return FA4
    # flash-attn-4 alone installs flash_attn/ as a namespace package without FlashAttention-2 in it
    return FA2 if _has("flash_attn.flash_attn_interface") else None


FA4_HEAD_DIMS = (64, 128)
"""The head sizes FA4's kernels ran at on an H200 (tests/gpu/test_flash_gpu.py, bench/attention_backends.py);
its Hopper backward has per-size tile choices, so other sizes (Pythia 2.8B's 80, say) stay on SDPA until measured."""


def supports(kind: str | None, dropout: float, window: int | None, head_dim: int) -> bool:
    if kind == FA2:
        return True
    return kind == FA4 and dropout == 0.0 and window is None and head_dim in FA4_HEAD_DIMS


def flash_attention(kind: str, q: Tensor, k: Tensor, v: Tensor, dropout: float, window: int | None) -> Tensor:
    """Causal attention; q [b, s, nq, d], k/v [b, s, nkv, d] (grouped heads natively) -> [b, s, nq, d]."""
    if kind == FA2:
        from flash_attn import flash_attn_func  # optional dependency

        # GPT-NeoX's sliding window: window_size=(w, -1), each query sees itself and w earlier keys.
        extra = {"window_size": (window, -1)} if window is not None else {}
        return flash_attn_func(q, k, v, dropout_p=dropout, causal=True, **extra)
    # contiguous so the fake kernels' strides are the real ones (v is a view of the fused QKV output)
    out, _ = torch.ops.neox.fa4_fwd(q.contiguous(), k.contiguous(), v.contiguous(), q.shape[-1] ** -0.5)
    return out


@functools.cache
def _fa4_replays() -> tuple[KernelReplay, KernelReplay] | None:
    """FA4's forward and backward, calling its compiled kernels directly once a shape has run
    (neox/model/kernel_replay.py): its Python front end left the GPU idle before each launch.
    None with NEOX_FA4_INTERFACE=1, a switch for benchmarking the direct calls against the interface."""
    if os.environ.get("NEOX_FA4_INTERFACE") == "1":
        return None
    from flash_attn.cute import interface

    owners = [f for f in vars(interface).values() if callable(f) and hasattr(f, "compile_cache")]
    return KernelReplay(owners, "flash-attn-4 forward"), KernelReplay(owners, "flash-attn-4 backward")


def _fa4_interface_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    res = _flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True)
    return res[0], res[1]  # later versions return more (probabilities, row maxima) after out and lse


def _fa4_interface_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=True)[:3]
    return dq, dk, dv


@torch.library.custom_op("neox::fa4_fwd", mutates_args=(), device_types="cuda")
def _fa4_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    if (replays := _fa4_replays()) is None:
        return _fa4_interface_fwd(q, k, v, scale)
    return replays[0](lambda *t: _fa4_interface_fwd(*t, scale), (q, k, v), (scale,))


@_fa4_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    b, s, h, _ = q.shape
    return q.new_empty(b, s, h, v.shape[-1]), q.new_empty(b, h, s, dtype=torch.float32)


@torch.library.custom_op("neox::fa4_bwd", mutates_args=(), device_types="cuda")
def _fa4_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    if (replays := _fa4_replays()) is None:
        return _fa4_interface_bwd(dout, q, k, v, out, lse, scale)
    return replays[1](lambda *t: _fa4_interface_bwd(*t, scale), (dout, q, k, v, out, lse), (scale,))


@_fa4_bwd.register_fake
def _(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
      scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output) -> None:
    q, k, v, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, dout: Tensor, _dlse: Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.neox.fa4_bwd(dout.contiguous(), q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_fa4_fwd.register_autograd(_backward, setup_context=_setup)
