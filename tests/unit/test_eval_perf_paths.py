"""The eval fast paths against the formulas they replace: the per-forward additive KV-cache mask, the
CUDA masked-GQA decode (query heads folded onto their KV head), and per-batch loglikelihood scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from neox.eval.lm import _score_hits  # noqa: E402
from neox.model.attention import masked_sdpa  # noqa: E402
from neox.model.kv_cache import KVCache  # noqa: E402


def _bool_mask(key_mask: torch.Tensor, seen: int, s: int, window: int | None) -> torch.Tensor:
    """The boolean mask as written before the cache kept one per forward."""
    t = seen + s
    causal = torch.ones(s, t, dtype=torch.bool).tril(diagonal=t - s)
    own = torch.zeros(s, t, dtype=torch.bool)
    own[:, t - s:] = torch.eye(s, dtype=torch.bool)
    mask = (causal & key_mask[:, None, None, :t]) | own
    if window is not None:
        q_pos, k_pos = torch.arange(t - s, t).unsqueeze(1), torch.arange(t).unsqueeze(0)
        mask = mask & (k_pos <= q_pos) & (q_pos - k_pos <= window)
    return mask


@pytest.mark.parametrize("window", [None, 3])
def test_additive_mask_matches_boolean_and_is_built_once(window):
    cache = KVCache.allocate(2, 3, 20, 2, 4)
    cache.key_mask = torch.arange(20)[None, :] >= torch.tensor([0, 2, 5])[:, None]
    for s in (7, 1, 1):
        ref = _bool_mask(cache.key_mask, cache.seen, s, window)
        add = cache.attn_mask(s, window, torch.float32)
        assert cache.attn_mask(s, window, torch.float32) is add  # the second layer gets the same tensor
        assert add.shape == ref.shape and add.stride(-2) % 8 == 0
        assert torch.equal(add, torch.zeros_like(add).masked_fill(~ref, float("-inf")))
        assert torch.equal(cache.attn_mask(s, window), ref)
        cache.seen += s


@pytest.mark.parametrize("s", [1, 5])
def test_expanded_gqa_equals_sdpa_gqa(s):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 8, s, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    key_mask = torch.arange(9)[None, :] >= torch.tensor([0, 3])[:, None]
    mask = torch.zeros(2, 1, s, 9).masked_fill(~_bool_mask(key_mask, 9 - s, s, None), float("-inf"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(masked_sdpa(q, k, v, mask, expand_gqa=True), ref, rtol=1e-5, atol=1e-6)


def test_batch_scoring_matches_per_request():
    g = torch.Generator().manual_seed(0)
    sizes = [3, 1, 2]
    logprobs = torch.log_softmax(torch.randn(sum(sizes), 11, generator=g), dim=-1)
    rows = logprobs.split(sizes)
    greedy0 = rows[0].argmax(-1).tolist()
    # row 0 its own greedy continuation, row 1 two one-token cache hits sharing it (as the harness
    # yields them), row 2 a continuation one token shorter than its row
    hits = [("a", greedy0, 0), ("b", [4], 1), ("c", [7], 1), ("d", [5], 2)]
    expected = []
    for _, cont, r in hits:  # the former per-request formula
        lp = rows[r].unsqueeze(0)
        cont_t = torch.tensor(cont, dtype=torch.long).unsqueeze(0)
        greedy = lp.argmax(dim=-1)
        expected.append((float(torch.gather(lp, 2, cont_t.unsqueeze(-1)).sum()),
                         bool((greedy[:, -cont_t.shape[1]:] == cont_t).all())))
    got = _score_hits(logprobs, sizes, hits)
    assert [b for _, b in got] == [b for _, b in expected] and expected[0][1]
    assert [a for a, _ in got] == pytest.approx([a for a, _ in expected], abs=1e-6)


def test_chunked_stop_check_equals_per_token():
    """Stop strings checked once per row and chunk cut the rows where the former per-token check did."""
    import random
    from types import SimpleNamespace

    from neox.eval.lm import NeoXLM, _stopped

    class Letters:  # id i -> one letter; id 0 is the EOD token
        vocab_size, eod = 27, 0

        def detokenize(self, ids):
            return "".join(chr(96 + i) for i in ids)

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.cfg = SimpleNamespace(max_position_embeddings=64, seq_length=64)

    lm = NeoXLM(Stub(), Letters())
    rng = random.Random(0)
    rows = [[rng.choice([0] + [1, 2, 3] * 8) for _ in range(48)] for _ in range(40)]
    until = ["ab", "ccc"]
    ref_out, ref_done = [[] for _ in rows], [False] * len(rows)
    for i, new in enumerate(rows):  # the former formula, a token at a time
        for t in new:
            if ref_done[i]:
                break
            if t == 0:
                ref_done[i] = True
                break
            ref_out[i].append(t)
            ref_done[i] = _stopped(lm.tok_decode(ref_out[i]), until)
    out, done = [[] for _ in rows], [False] * len(rows)
    for c in range(0, 48, 16):
        lm._take([r[c:c + 16] for r in rows], out, done, until)
    assert out == ref_out and done == ref_done
    assert sum(done) > 20 and len({len(o) for o in out}) > 5  # stops and EODs at many places
