"""CUDA with FP8 tensor cores (compute capability 8.9+) only: the real torchao float8 kernels
(torch._scaled_mm) against torchao's emulation (the path the CPU tests check against Float8Linear
and the multi-rank runs), for a column- and a row-parallel linear and one compiled transformer block,
forward and gradients.

Both sides cast to FP8 with the same code and scales, so the FP8 operands are bit-identical; what
differs is the GEMM: fp32 (or Hopper's fast) accumulation on the tensor cores and the bf16 output
rounding, against an fp32 matmul of the dequantised operands. bf16's 8-bit mantissa gives ~4e-3
relative rounding, so 1e-2 (relative norm) for one linear and 3e-2 after a block's six GEMMs,
attention and norms in bf16.
"""

import pytest
import torch

from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from neox.config.compat import fp8_plan
from neox.config.optim import PrecisionConfig


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _fp8_gpu(), reason="needs CUDA with compute capability 8.9+")]
pytest.importorskip("torchao.float8")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _plan(recipe: str, emulate: bool):
    return fp8_plan(PrecisionConfig(fp8_recipe=recipe, fp8_emulate=emulate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32_params_autocast", "bf16_params"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_real_fp8_linear_matches_emulation(kind, recipe, dtype):
    from neox.model.fp8 import fp8_linear_fn

    torch.manual_seed(0)
    cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
    layers = [cls(1024, 768, bias=False, device="cuda", dtype=dtype) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    for layer, emulate in zip(layers, (True, False)):
        layer.linear_fn = fp8_linear_fn(_plan(recipe, emulate))
    x = torch.randn(4, 512, 1024, device="cuda", dtype=dtype)
    g = torch.randn(4, 512, 768, device="cuda", dtype=torch.bfloat16)
    outs = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xi)
        y.backward(g.to(y.dtype))
        outs.append((y, xi.grad, layer.weight.grad))
    (y_emu, gx_emu, gw_emu), (y, gx, gw) = outs
    assert _rel(y, y_emu) < 1e-2
    assert _rel(gx, gx_emu) < 1e-2
    assert _rel(gw, gw_emu) < 1e-2


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_real_fp8_compiled_block_matches_emulation(recipe):
    """One block as training runs it (bf16 autocast, torch.compile): real kernels are no further from the
    block without FP8 than emulation is.

    Compiled, the two FP8 sides are not bit-comparable: Inductor fuses each graph its own way and feeds
    some FP8 casts unrounded fp32 intermediates where another graph rounds them to bf16 first, which moves
    this block's weight gradients by ~4-5% (measured on CPU with emulation on both sides, compiled against
    eager: qkv 4.7%, linear2 4.0%; output 0.09%). A direct real-vs-emulated bound failed on the H200 in
    sessions 7 and 8. So each FP8 side is held against the same block in bf16: a wrong real kernel (a
    scale, a layout) would sit far from it, a right one as close as emulation."""
    from neox.config.model import ModelConfig
    from neox.model import GPTModel
    from neox.model.fp8 import convert_block_linears
    from neox.model.gpt import rotary_for

    cfg = ModelConfig(
        num_layers=1, hidden_size=1024, num_attention_heads=8, num_kv_heads=2, attention_type="groupedquery",
        seq_length=512, max_position_embeddings=512, intermediate_size=2816, padded_vocab_size=2048,
        norm="rmsnorm", rms_norm_epsilon=1e-5, pos_emb="rotary", rotary_emb_base=10000.0, mlp_type="llama",
        activation="silu", use_bias_in_norms=False, use_bias_in_attn_linear=False, no_weight_tying=True,
        attention_config=["flash"],
    )
    torch.manual_seed(0)
    models = [GPTModel(cfg, device="cuda") for _ in range(3)]  # bf16, emulated FP8, real FP8
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    for model, emulate in zip(models[1:], (True, False)):
        convert_block_linears(model, PrecisionConfig(fp8_recipe=recipe, fp8_emulate=emulate), torch.device("cuda"))
    x = torch.randn(2, 512, 1024, device="cuda")
    rotary = rotary_for(cfg, torch.arange(512, device="cuda").expand(2, 512))
    outs = []
    for model in models:
        block = torch.compile(model.layers[0])
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(xi, rotary)
        y.float().square().mean().backward()
        layer = model.layers[0]
        outs.append((y, xi.grad, layer.attention.query_key_value.weight.grad, layer.mlp.linear2.weight.grad))
    for name, ref, emu, real in zip(("out", "dx", "dqkv", "dlinear2"), *outs):
        e_emu, e_real = _rel(emu, ref), _rel(real, ref)
        print(f"{recipe} {name}: emulated {e_emu:.4f}, real {e_real:.4f} (relative to bf16)")
        assert e_real <= 1.5 * e_emu + 1e-2, (name, e_real, e_emu)
