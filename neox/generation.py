"""Text generation: sampling, the decode loop (with or without KV cache), the three NeoX modes.

``generate_tokens(model, prompt_ids, params)`` runs on every tensor-parallel rank of a ``GPTModel``;
the vocab-parallel logits are gathered so every rank sees the whole vocabulary, and the chosen token
is broadcast from the group's first rank, so all ranks decode the same sequence (sampling included).
Padding rows of the vocabulary (beyond the tokenizer's size) are never chosen.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from megatron_core.tensor_parallel import gather_from_tensor_model_parallel_region
from neox.errors import CheckpointError, ConfigError, DataError
from neox.model.decode_graph import DecodeGraph, graph_safe

if TYPE_CHECKING:
    from neox.config.model import ModelConfig


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; ``temperature == 0`` is greedy."""

    maximum_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    eod: int | None = None
    """Stop after generating this token (it is kept in the output)."""
    vocab_size: int | None = None
    """The tokenizer's vocabulary; logits of the padding rows above it are ignored."""
    use_cache: bool = True
    """Decode with a KV cache (one new token per step) instead of recomputing the whole sequence."""
    cuda_graphs: bool = True
    """With the cache, on a GPU where it is safe (neox.model.decode_graph.graph_safe): each step a replayed CUDA graph."""


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit [b, V] outside the top-k and outside the smallest set of mass top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [b] from fp32 logits [b, V]."""
    if params.vocab_size is not None and params.vocab_size < logits.shape[-1]:
        logits = logits[..., : params.vocab_size]
    if params.temperature <= 0.0:
        return torch.argmax(logits, dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def gather_vocab(x: torch.Tensor) -> torch.Tensor:
    """[..., V/tp] -> [..., V] over the tensor-parallel group (as is at tensor-parallel size 1)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        return gather_from_tensor_model_parallel_region(x)
    return x


def _full_vocab_last(logits: torch.Tensor) -> torch.Tensor:
    """The last position's logits over the whole vocabulary, fp32 [b, V] (gathered over TP ranks)."""
    return gather_vocab(logits[:, -1:].float())[:, 0]


def agree_tokens(token: torch.Tensor) -> torch.Tensor:
    """Every TP rank continues with its group's first rank's tokens (sampling included)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(token, parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
    return token


def max_context(cfg: ModelConfig) -> int:
    return cfg.max_position_embeddings or cfg.seq_length


@torch.no_grad()
def generate_tokens(model: torch.nn.Module, prompt_ids: list[int], params: SamplingParams,
                    generator: torch.Generator | None = None) -> list[int]:
    """The generated continuation of one prompt (without the prompt), stopping at EOD or the length cap."""
    if not prompt_ids:
        raise DataError("generate: empty prompt (unconditional generation starts from the EOD token)")
    device = next(model.parameters()).device
    limit = max_context(model.cfg)
    prompt_ids = prompt_ids[-(limit - 1):]  # keep room for at least one new token
    budget = min(params.maximum_tokens, limit - len(prompt_ids))
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = model.allocate_kv_cache(1, len(prompt_ids) + budget) if params.use_cache else None
    logits = model(ids, kv_cache=cache, last_only=True)
    out: list[int] = []
    use_graph = cache is not None and params.cuda_graphs and graph_safe(model)
    graph = None  # captured at the first decode step, freed at the end
    try:
        for step in range(budget):
            token = agree_tokens(sample_next(_full_vocab_last(logits), params, generator).reshape(1))
            out.append(int(token.item()))  # the one host sync a step
            if out[-1] == params.eod or step == budget - 1:
                break
            if use_graph:
                graph = graph or DecodeGraph(model, cache)
                logits = graph.step(token.view(1, 1))
            elif cache is not None:
                logits = model(token.view(1, 1), kv_cache=cache)
            else:
                ids = torch.cat([ids, token.view(1, 1)], dim=1)
                logits = model(ids, last_only=True)
    finally:
        if graph is not None:
            graph.close()
    return out


def read_prompts(path: str, prompt_end: str = "\n") -> list[str]:
    """Prompts of sample_input_file, separated by ``prompt_end``; blank ones dropped."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise DataError(f"sample_input_file: cannot read {path} ({err.strerror})") from err
    return [p for p in text.split(prompt_end) if p.strip()]


@dataclass
class Generator:
    """Tokenize, generate, detokenize: what each text_gen_type needs, around one model."""

    model: torch.nn.Module
    tokenizer: Any
    params: SamplingParams
    rng: torch.Generator | None = None

    def complete(self, context: str) -> dict[str, Any]:
        ids = self.tokenizer.tokenize(context) if context else [self.tokenizer.eod]
        start = time.perf_counter()
        new = generate_tokens(self.model, ids, self.params, self.rng)
        secs = time.perf_counter() - start
        shown = new[:-1] if new and new[-1] == self.params.eod else new
        return {"context": context, "text": self.tokenizer.detokenize(shown), "tokens": len(new),
                "seconds": round(secs, 4)}

    def run(self, contexts: Iterable[str], write: Callable[[dict[str, Any]], None]) -> dict[str, float]:
        """Complete each context and ``write`` its record; returns totals for the summary line."""
        from tqdm import tqdm

        n, tokens, start = 0, 0, time.perf_counter()
        for context in tqdm(list(contexts), desc="generating", unit="sample", disable=not _is_first()):
            rec = self.complete(context)
            n, tokens = n + 1, tokens + rec["tokens"]
            write(rec)
        secs = time.perf_counter() - start
        return {"samples": n, "tokens": tokens, "seconds": secs, "tokens_per_sec": tokens / max(secs, 1e-9)}


def _is_first() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def jsonl_writer(stream: TextIO) -> Callable[[dict[str, Any]], None]:
    """Write {context, text} records as JSON lines (rank 0 only)."""

    def write(rec: dict[str, Any]) -> None:
        if _is_first():
            stream.write(json.dumps({"context": rec["context"], "text": rec["text"]}, ensure_ascii=False) + "\n")
            stream.flush()

    return write


def run_mode(gen: Generator, textgen: Any, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> dict[str, float]:
    """One of NeoX's text_gen_type modes: 'unconditional', 'input-file' or 'interactive'."""
    import sys

    mode = textgen.text_gen_type
    if mode == "interactive":
        return _interactive(gen, stdin or sys.stdin, stdout or sys.stdout)
    if mode == "unconditional":
        contexts = [""] * textgen.num_samples
    elif mode == "input-file":
        if not textgen.sample_input_file:
            raise ConfigError("sample_input_file: required with text_gen_type: input-file")
        contexts = read_prompts(textgen.sample_input_file, textgen.prompt_end)
    else:
        raise ConfigError(f"text_gen_type: expected 'unconditional', 'input-file' or 'interactive', got {mode!r}")
    out = open(textgen.sample_output_file, "w", encoding="utf-8") if _is_first() else None  # noqa: SIM115
    try:
        return gen.run(contexts, jsonl_writer(out) if out else lambda rec: None)
    finally:
        if out:
            out.close()


def _interactive(gen: Generator, stdin: TextIO, stdout: TextIO) -> dict[str, float]:
    """Read a prompt per line on rank 0, share it with every rank, print the completion."""
    totals = {"samples": 0, "tokens": 0, "seconds": 0.0}
    while True:
        if _is_first():
            stdout.write("prompt (empty line to quit)> ")
            stdout.flush()
        line = _share_line(stdin.readline() if _is_first() else "")
        if not line.strip():
            break
        rec = gen.complete(line.rstrip("\n"))
        if _is_first():
            stdout.write(rec["text"] + "\n")
            stdout.flush()
        totals = {"samples": totals["samples"] + 1, "tokens": totals["tokens"] + rec["tokens"],
                  "seconds": totals["seconds"] + rec["seconds"]}
    totals["tokens_per_sec"] = totals["tokens"] / max(totals["seconds"], 1e-9)
    return totals


def _share_line(line: str) -> str:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return line
    box = [line]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_weights(model: torch.nn.Module, load: str, cfg: ModelConfig) -> int:
    """Fill this rank's shard of ``model`` from the checkpoint at ``load`` (any TP/PP layout); returns tensors."""
    from neox.convert import names, weights
    from neox.model.layout import layout_of

    full = weights.read_full_weights(load, cfg)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    layout = layout_of(model, tp)
    state = {}
    for name, mine in model.state_dict().items():
        if name not in full:
            raise CheckpointError(f"{load}: no weights for {name}")
        t = full[name]
        split = layout[name].split if name in layout else None
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            t = names.pad_vocab(t, mine.shape[0] * tp)  # a checkpoint padded for a smaller TP size
        state[name] = weights.shard_for_rank(name, t, split, tp, rank)
        if state[name].shape != mine.shape:
            raise CheckpointError(f"{load}: {name} has shard shape {tuple(state[name].shape)}, "
                                  f"the model expects {tuple(mine.shape)}")
    model.load_state_dict(state)
    return len(state)
