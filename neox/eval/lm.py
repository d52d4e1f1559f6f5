"""``NeoXLM``: lm-evaluation-harness's ``LM`` over a neox ``GPTModel`` at any tensor/data-parallel layout.

Tokenisation, request ordering, batching, left truncation and rolling windows follow the harness's
own Hugging Face backend (``lm_eval/models/huggingface.py``), so a neox checkpoint and its
``tools/convert_neox_to_hf.py`` export score alike. Data-parallel ranks each take the harness's share
of the requests (``rank``/``world_size`` are the data-parallel ones); tensor-parallel ranks of one
replica run the same requests and gather the vocab-parallel logits. ``generate_until`` decodes a
batch at a time with the KV cache (left padding masked), greedy or sampled; on a GPU each decode step
is a replayed CUDA graph (neox/model/decode_graph.py) unless ``cuda_graphs=False`` or unsafe there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from megatron_core import parallel_state
from neox.generation import SamplingParams, agree_tokens, gather_vocab, max_context, sample_next
from neox.model.decode_graph import DecodeGraph, graph_safe

DEFAULT_MAX_GEN_TOKS = 256  # the harness's HF backend default
STOP_CHECK_EVERY = 16  # greedy decoding steps between reads of the new tokens (stop sequences, EOD)


class NeoXLM(TemplateLM):
    """The harness's model interface; ``tokenizer`` is a neox tokenizer (neox.tokenizer.build).

    ``cuda_graphs``: decode steps of ``generate_until`` as replays of one captured step where that is safe
    (``graph_safe``: CUDA, tensor-parallel size 1, eval mode); False keeps the eager loop everywhere.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 8,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 1234,
                 cuda_graphs: bool = True) -> None:
        super().__init__()
        self.model, self.neox_tokenizer = model, tokenizer
        self.cuda_graphs = cuda_graphs
        self._batch_size = max(int(batch_size), 1)
        self._max_length = max_length or max_context(model.cfg)
        self._max_gen_toks = max_gen_toks
        self._device = next(model.parameters()).device
        self.vocab_size = tokenizer.vocab_size
        self._bos = _bos_id(tokenizer)
        self.generator = torch.Generator().manual_seed(seed)
        if parallel_state.is_initialized() and dist.is_initialized():
            self._rank = parallel_state.get_data_parallel_rank()
            self._world_size = parallel_state.get_data_parallel_world_size()

    # ---- what the harness reads -----------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.neox_tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        return self._bos if self._bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return type(self.neox_tokenizer).__name__

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        out = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor, group=parallel_state.get_data_parallel_group())
        return torch.stack(out) if tensor.dim() == 0 else torch.cat(out)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=parallel_state.get_data_parallel_group())
        return out if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=parallel_state.get_data_parallel_group())

    # ---- tokens ---------------------------------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """As the HF backend: the tokenizer's special tokens (a BOS) unless told not to, or already present."""
        special = add_special_tokens
        if special is None:
            special = not (self._bos is not None and string.startswith(self.tok_decode([self._bos], False) or "\0"))
        ids = _encode(self.neox_tokenizer, string, special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        tokens = [int(t) for t in tokens]
        if skip_special_tokens:
            special = {self.eot_token_id, self._bos}
            tokens = [t for t in tokens if t not in special]
        return self.neox_tokenizer.detokenize(tokens)

    # ---- the model ------------------------------------------------------------------------------

    @torch.no_grad()
    def _model_call(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's vocab-parallel logits [b, s, V/tp] of right-padded ``ids``."""
        return self.model(ids.to(self._device))

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        res: list[tuple[float, bool]] = []

        def collate(req: tuple) -> tuple:
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(requests, sort_fn=collate, group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for chunk in re_ord.get_batched(n=override_bs or self.batch_size):
            logprobs, sizes = self._score_chunk(chunk)
            rows = logprobs.split(sizes)
            hits = [(req_str, cont, r) for r, (request_str, ctx_toks, cont_toks) in enumerate(chunk)
                    for req_str, cont, _ in re_ord.get_cache(req_str=request_str, cxt_toks=ctx_toks,
                                                             cont_toks=list(cont_toks), logits=rows[r].unsqueeze(0))]
            for (req_str, _, _), answer in zip(hits, _score_hits(logprobs, sizes, hits), strict=True):
                res.append(answer)
                if req_str is not None:
                    self.cache_hook.add_partial("loglikelihood", req_str, answer)
                pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def _score_chunk(self, chunk: list[tuple]) -> tuple[torch.Tensor, list[int]]:
        """fp32 log-probabilities [sum contlen, V] of the continuation positions of a batch, and each contlen."""
        inps, spans = [], []
        for _, ctx, cont in chunk:
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]  # left truncation, as the HF backend
            inps.append(inp)
            spans.append((len(inp) - len(cont), len(inp)))
        width = max(len(x) for x in inps)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if getattr(self.model, "sequence_parallel", False):
            width = -(-width // tp) * tp  # the sequence is split over the tensor-parallel ranks
        ids = torch.zeros(len(inps), width, dtype=torch.long)
        for i, inp in enumerate(inps):
            ids[i, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        logits = self._model_call(ids)
        picked = torch.cat([logits[i, a:b] for i, (a, b) in enumerate(spans)])  # [sum contlen, V/tp]
        logprobs = F.log_softmax(gather_vocab(picked.float())[:, :self.vocab_size], dim=-1)
        return logprobs, [b - a for a, b in spans]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, counts = [], []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm or self.rank != 0):
            rolling = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += [(None, *w) for w in rolling]
            counts.append(len(rolling))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True) if windows else []
        out, pos = [], 0
        for req, n in zip(requests, counts, strict=True):
            total = sum(s for s, _ in scores[pos:pos + n])
            pos += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return out

    # ---- generation -----------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        res: list[str] = []
        re_ords = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                           group_by="gen_kwargs", group_fn=lambda r: r[1])
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running generate_until requests")
        for chunk in re_ords.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False) or None
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {max_gen} must be below the model's context of {self.max_length}")
            params = _sampling(kwargs, self.vocab_size)
            encoded = [self.tok_encode(c, left_truncate_len=max_ctx) for c in contexts]
            for context, toks in zip(contexts, self.generate_batch(encoded, until, max_gen, params), strict=True):
                text = postprocess_generated_text(self.tok_decode(toks), stop=until, think_end_token=None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                pbar.update(1)
        pbar.close()
        return re_ords.get_original(res)

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], until: list[str], max_gen: int,
                       params: SamplingParams) -> list[list[int]]:
        """New tokens of each prompt (EOD dropped): decoded together, left-padded, with the KV cache."""
        if getattr(self.model, "sequence_parallel", False):
            raise ValueError("generate_until: decoding does not run with sequence_parallel; evaluate without it")
        b, width = len(prompts), max(len(p) for p in prompts)
        pad = torch.tensor([width - len(p) for p in prompts], device=self._device)
        ids = torch.zeros(b, width, dtype=torch.long, device=self._device)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        cache = self.model.allocate_kv_cache(b, width + max_gen)
        cache.key_mask = torch.arange(width + max_gen, device=self._device)[None, :] >= pad[:, None]
        positions = (torch.arange(width, device=self._device)[None, :] - pad[:, None]).clamp(min=0)
        logits = self.model(ids, position_ids=positions, kv_cache=cache, last_only=True)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        # Greedy tokens are read back every STOP_CHECK_EVERY steps, so the host queues the next steps'
        # kernels instead of waiting for each token; a row that stopped early wastes at most that many
        # steps, and its output is cut where it stopped. Sampling reads every step (its draws stay as they were).
        every = 1 if params.temperature > 0 else STOP_CHECK_EVERY
        pending: list[torch.Tensor] = []
        # the decode steps replay one captured step where that is safe (captured at the first one, freed after the batch)
        use_graph, graph = self.cuda_graphs and graph_safe(self.model), None
        try:
            for step in range(max_gen):
                last = gather_vocab(logits[:, -1].float())  # [b, V]
                token = agree_tokens(sample_next(last, params, self.generator))
                pending.append(token)
                final = step == max_gen - 1
                if len(pending) == every or final:
                    self._take(torch.stack(pending, dim=1).tolist(), out, done, until)
                    pending = []
                    if all(done):
                        break
                if final:
                    break
                position = (width + step - pad).view(b, 1)
                if use_graph:
                    graph = graph or DecodeGraph(self.model, cache)
                    logits = graph.step(token.view(b, 1), position)
                else:
                    logits = self.model(token.view(b, 1), position_ids=position, kv_cache=cache)
        finally:
            if graph is not None:
                graph.close()
        return out

    def _take(self, rows: list[list[int]], out: list[list[int]], done: list[bool], until: list[str]) -> None:
        """Append each unfinished row's new tokens up to its EOD or the first stop sequence.

        The text is decoded once per row and chunk, not once per token (with CUDA-graphed steps the per-token
        decoding took as long as the decoding itself); only a chunk whose text has a stop string is walked
        token by token, to cut it after the token where the stop string first appears, as before.
        """
        for i, new in enumerate(rows):
            if done[i]:
                continue
            start = len(out[i])
            for t in new:
                if t == self.eot_token_id:
                    done[i] = True
                    break
                out[i].append(t)
            if len(out[i]) == start or not _stopped(self.tok_decode(out[i]), until):
                continue
            kept, done[i] = out[i][start:], True
            del out[i][start:]
            for t in kept:
                out[i].append(t)
                if _stopped(self.tok_decode(out[i]), until):
                    break


def _score_hits(logprobs: torch.Tensor, sizes: list[int], hits: list[tuple[Any, Any, int]]) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether it is the greedy one) for each request.

    ``logprobs`` [sum contlen, V] are a batch's rows of ``sizes`` positions; ``hits`` the harness's
    (request, continuation tokens, row). Scored on the device and read back once: one host sync a batch,
    not two a request. As the HF backend, a continuation shorter than its row (a harness cache hit that
    shares another request's row) takes its log-probabilities from the row's first positions, its greedy
    check from the last.
    """
    conts = [[int(t) for t in c] for _, c, _ in hits]
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    width = max(len(c) for c in conts)
    toks, at_lp, at_greedy = [], [], []
    for c, (_, _, r) in zip(conts, hits, strict=True):
        n, start, pad = len(c), offsets[r], [0] * (width - len(c))
        toks.append(c + pad)
        at_lp.append(list(range(start, start + n)) + pad)
        at_greedy.append(list(range(start + sizes[r] - n, start + sizes[r])) + pad)
    dev = logprobs.device
    toks, at_lp, at_greedy = (torch.tensor(x, dtype=torch.long, device=dev) for x in (toks, at_lp, at_greedy))
    real = torch.arange(width, device=dev)[None, :] < torch.tensor([len(c) for c in conts], device=dev)[:, None]
    picked = logprobs[at_lp, toks].masked_fill(~real, 0.0)
    greedy = (logprobs.argmax(dim=-1)[at_greedy] == toks) | ~real
    return list(zip(picked.sum(dim=-1).tolist(), greedy.all(dim=-1).tolist(), strict=True))


def _stopped(text: str, until: list[str]) -> bool:
    return any(s and s in text for s in until)


def _sampling(kwargs: dict[str, Any], vocab_size: int) -> SamplingParams:
    """neox's sampling settings from the harness's normalised gen_kwargs (greedy unless do_sample)."""
    sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0.0
    return SamplingParams(temperature=float(kwargs["temperature"]) if sample else 0.0,
                          top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 0.0),
                          vocab_size=vocab_size)


def _bos_id(tokenizer: Any) -> int | None:
    """The BOS a Hugging Face export of this tokenizer adds (SentencePiece ``<s>``), else None."""
    sp = getattr(tokenizer, "_sp", None)
    if sp is not None and sp.bos_id() >= 0:
        return int(sp.bos_id())
    return None


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    """Token ids as transformers' tokenizer of the export encodes them (its special tokens when ``special``)."""
    hf = getattr(tokenizer, "_tok", None)
    if hf is not None:  # tokenizer.json: its post-processor adds what transformers would add
        return list(hf.encode(text, add_special_tokens=special).ids)
    ids = list(tokenizer.tokenize(text)) if text else []
    bos = _bos_id(tokenizer)
    return [bos, *ids] if special and bos is not None else ids
