"""One decode step of a ``GPTModel`` (the forward of [b, 1] tokens through its KV cache) as a CUDA graph.

Batched decoding of a 1B model is launch-bound: a step is about fifty small kernels a layer, each
launched from Python. Captured once per batch and replayed, a step is one launch (the lever of
transformers' static cache with "reduce-overhead", vLLM and gpt-fast). The cache runs in its static
mode (neox/model/kv_cache.py: the write slot is a device tensor, every shape fixed), the step reads
token ids and positions from static buffers and writes its logits into a static [b, 1, V/tp] buffer;
the captured forward also advances the cache's slot, so a replay is the whole step. The forward is
the one eager decoding runs; only the attention reads the whole cache with the unwritten slots masked.

Only where capture is safe (``graph_safe``); elsewhere callers keep their eager loop. Without
``capture`` (CPU) the same static step runs eagerly, which is how the CPU tests check it.
"""

from __future__ import annotations

import torch

from megatron_core import parallel_state
from neox.model.kv_cache import KVCache

WARMUP = 2  # eager steps off the default stream before capture (PyTorch's CUDA-graph recipe): lazy inits, kernel choices


def graph_safe(model: torch.nn.Module) -> bool:
    """Whether one decode step of ``model`` can be captured: CUDA, eval mode (no dropout draws), tensor-parallel
    size 1 and no sequence parallelism (no collectives in the graph), no autocast (its cast cache is refused
    under capture), and plain eager modules: FP8 linears, torch.compile'd blocks and forward hooks (DeepSpeed
    ZeRO-3 gathers its partitioned parameters in them), which in-training evaluation may hand over, are not
    checked under capture."""
    p = next(model.parameters(), None)
    if p is None or not p.is_cuda or model.training or getattr(model, "sequence_parallel", False):
        return False
    if parallel_state.is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        return False
    if torch.is_autocast_enabled("cuda"):
        return False
    return not any(_not_plain(m) for m in model.modules())


def is_compiled(m: torch.nn.Module) -> bool:
    """Whether ``m`` was compiled in place (``Module.compile()``, how training compiles its blocks)."""
    return getattr(m, "_compiled_call_impl", None) is not None


def _not_plain(m: torch.nn.Module) -> bool:
    return "linear_fn" in vars(m) or is_compiled(m) or bool(m._forward_pre_hooks) or bool(m._forward_hooks)


class DecodeGraph:
    """Decode steps of ``model`` through ``cache`` (after its prompt forward), captured on CUDA.

    ``step(tokens, positions)`` returns the logits buffer, overwritten by the next step: read it first
    (work queued on the stream before the next step is). ``close()`` frees the graph and its memory pool.
    """

    def __init__(self, model: torch.nn.Module, cache: KVCache, *, capture: bool | None = None) -> None:
        dev = cache.keys[0].device
        b = cache.keys[0].shape[0]
        self.model, self.cache = model, cache
        if cache.position is None:
            cache.start_static()
        self.steps_left = cache.max_length - cache.seen  # host-side count: a bounds check on the device would sync
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if dev.type == "cuda" if capture is None else capture:
            self._capture()

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        return self.model(self.ids, position_ids=self.positions, kv_cache=self.cache)

    def _capture(self) -> None:
        # Warm-up and capture write keys/values at the current slot and later ones; the real steps write
        # each slot before any query can see it (later slots are masked), so those writes are harmless.
        start = self.cache.position.clone()
        self.graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.graph(self.graph)
        # Warm up on the stream the capture runs on (torch's one capture stream): its lazy per-stream state
        # (cuBLAS workspace) is set up outside the capture, once per process rather than once per batch.
        side = capture.capture_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.cache.position.copy_(start)  # each warm-up step at the first slot: never past the cache
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.cache.position.copy_(start)
        with capture:  # recorded, not run: the slot stays at start
            self.logits = self._forward()

    def step(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, 1, V/tp] of ``tokens`` [b, 1] at ``positions`` [b, 1] (None: the cache slot, no padding)."""
        if self.steps_left <= 0:
            raise ValueError(f"KV cache holds {self.cache.max_length} tokens; decode step past it")
        self.ids.copy_(tokens.view_as(self.ids))
        if positions is None:
            self.positions.copy_(self.cache.position.expand_as(self.positions))
        else:
            self.positions.copy_(positions.view_as(self.positions))
        self.steps_left -= 1
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits

    def close(self) -> None:
        """Free the graph and its private memory pool (the cache belongs to the caller)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.logits = None, None
