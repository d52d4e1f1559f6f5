"""Left-padded (masked) GQA attention through the KV cache on a GPU, the path batched evaluation decodes
with: CUDA's masked kernels take no GQA, so neox folds query heads (one new token) or copies k/v per
head (a prompt). Checked in fp32 and bf16 against SDPA's math kernel with ``enable_gqa`` on the
boolean mask, and that it does not run on the math kernel."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from neox.model.attention import masked_sdpa
from neox.model.kv_cache import KVCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("s", [1, 37])
def test_masked_gqa_matches_math_reference(dtype, tol, s):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, t = 3, 90
    q = torch.randn(b, 32, s, 64, device="cuda", generator=g)
    k, v = (torch.randn(b, 4, t, 64, device="cuda", generator=g) for _ in range(2))
    cache = KVCache.allocate(1, b, 128, 4, 64, device="cuda", dtype=dtype)
    cache.key_mask = torch.arange(128, device="cuda")[None, :] >= torch.tensor([0, 5, 30], device="cuda")[:, None]
    cache.seen = t - s
    boolean = cache.attn_mask(s)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=boolean, enable_gqa=True)
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        out = masked_sdpa(qd, kd, vd, cache.attn_mask(s, None, dtype)).float()  # no math fallback allowed
    assert (out - ref).abs().max().item() < tol
