"""The residual stream under torch.autocast over fp32 weights: in the autocast dtype by default
(Megatron's default), in fp32 with fp32_residual_connection. Reference: transformers' Llama in fp32."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from neox.config import NeoXArgs
from neox.errors import ConfigError
from neox.model import GPTModel
from neox.model.norms import Norm
from tests.unit.test_model import S, V, _randomise, llama_cfg, to_llama


def _block_input_dtypes(model: GPTModel, ids: torch.Tensor) -> tuple[set[torch.dtype], torch.Tensor]:
    seen: set[torch.dtype] = set()
    hooks = [layer.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype)) for layer in model.layers]
    try:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            logits = model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


@pytest.mark.parametrize("fp32_residual", [False, True])
def test_autocast_residual_dtype_and_logits(fp32_residual):
    cfg = llama_cfg(fp32_residual_connection=fp32_residual)
    model = GPTModel(cfg, seed=3).eval()
    _randomise(model)
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mismatch dtype ... cannot dispatch to fused" fallbacks
        dtypes, logits = _block_input_dtypes(model, ids)
    assert dtypes == {torch.float32 if fp32_residual else torch.bfloat16}
    with torch.no_grad():
        ref = to_llama(model, cfg)(ids).logits
    rel = (logits.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_without_autocast_the_stream_stays_fp32():
    model = GPTModel(llama_cfg(), seed=3).eval()
    ids = torch.randint(0, V, (1, S), generator=torch.Generator().manual_seed(2))
    seen: list[torch.dtype] = []
    model.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    with torch.no_grad():
        model(ids)
    assert seen == [torch.float32]


def test_half_input_norm_over_fp32_weight():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g).bfloat16()
    norm = Norm("rmsnorm", 16, 1e-5, bias=False)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=g) + 0.5)
        out = norm(x)
    ref = F.rms_norm(x.float(), (16,), norm.weight, 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1.6e-2, atol=1e-2)


def test_fp32_residual_with_bf16_parameters_is_refused():
    base = {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "seq_length": 8,
            "tokenizer_type": "CharLevelTokenizer", "train_micro_batch_size_per_gpu": 1, "train_iters": 1,
            "precision": "bfloat16", "bf16": {"enabled": True}, "fp32_residual_connection": True}
    with pytest.raises(ConfigError, match="fp32_residual_connection: only with fp32 parameters") as err:
        NeoXArgs.from_flat(base, world_size=1).validate()
    assert "\n" not in str(err.value)
