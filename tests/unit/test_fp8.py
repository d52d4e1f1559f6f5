"""FP8 block linears (neox/model/fp8.py) on CPU through torchao's emulation.

References: torchao's own ``Float8Linear`` on the same weights (forward and gradients), the plain
model's state_dict (names and tensors unchanged), GPT-NeoX's configs/1-3B-transformer-engine.yml.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from neox.config import NeoXArgs
from neox.config.compat import fp8_plan
from neox.config.optim import PrecisionConfig
from neox.errors import ConfigError

torchao_float8 = pytest.importorskip("torchao.float8")

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "neox_configs"
CPU = torch.device("cpu")
EMU = dict(fp8_emulate=True)


def _precision(**kw) -> PrecisionConfig:
    return PrecisionConfig(**kw)


def _reference(layer: torch.nn.Module, plan, bias: torch.Tensor | None) -> torch.nn.Module:
    """torchao's Float8Linear holding the same weight and bias as ``layer``."""
    from torchao.float8.float8_linear import Float8Linear

    from neox.model.fp8 import float8_config

    lin = torch.nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(layer.weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return Float8Linear.from_float(lin, config=float8_config(plan))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_forward_and_grads_equal_torchao_float8linear(recipe, kind):
    from neox.model.fp8 import fp8_linear_fn

    torch.manual_seed(0)
    plan = fp8_plan(_precision(fp8_recipe=recipe, **EMU))
    cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
    layer = cls(48, 40, bias=True)
    with torch.no_grad():
        layer.bias.normal_()
    layer.linear_fn = fp8_linear_fn(plan)
    ref = _reference(layer, plan, layer.bias)
    x = torch.randn(3, 7, 48)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = layer(x1), ref(x2)
    assert torch.equal(y, y_ref)
    assert not torch.allclose(y, F.linear(x, layer.weight, layer.bias), atol=1e-3)  # FP8 rounding is really there
    g = torch.randn_like(y)
    y.backward(g), y_ref.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(layer.weight.grad, ref.weight.grad)
    assert torch.equal(layer.bias.grad, ref.bias.grad)


def _tiny_model(no_weight_tying: bool = True):
    from neox.model import GPTModel

    a = NeoXArgs.from_flat({
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 16, "norm": "rmsnorm",
        "pos_emb": "rotary", "activation": "swiglu", "intermediate_size": 128, "no_weight_tying": no_weight_tying,
        "padded_vocab_size": 256, "tokenizer_type": "CharLevelTokenizer",
    }, world_size=1)
    return GPTModel(a.model, seed=1)


def _fp8_layers(model) -> set[str]:
    return {n for n, m in model.named_modules() if "linear_fn" in vars(m)}


ALL = {f"layers.{i}.{n}" for i in range(2) for n in
       ("attention.query_key_value", "attention.dense", "mlp.linear1", "mlp.linear2")}


@pytest.mark.parametrize("keys,expected", [
    ({"fp8_recipe": "tensorwise"}, ALL),
    ({"fp8_recipe": "rowwise", "te_mha": True}, ALL),
    ({"te_mha": True}, {n for n in ALL if ".attention." in n}),
    ({"te_layernorm_mlp": True}, {n for n in ALL if ".mlp." in n}),
    ({"te_columnparallel": True}, {n for n in ALL if n.endswith(("query_key_value", "linear1"))}),
    ({"te_rowparallel": True, "te_mha": True}, {n for n in ALL if not n.endswith("linear1")}),
    ({}, set()),
])
def test_exactly_the_block_linears_become_fp8(keys, expected):
    from neox.model.fp8 import convert_block_linears

    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = convert_block_linears(model, _precision(**keys, **EMU), CPU)
    assert set(names) == expected == _fp8_layers(model)
    assert "embedding.word_embeddings" not in _fp8_layers(model) and "output_layer" not in _fp8_layers(model)
    assert type(model.output_layer).linear_fn is model.output_layer.linear_fn  # still the class's F.linear
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())  # plain tensors for ZeRO and checkpoints


def test_fp8_model_forward_matches_per_layer_float8linear_reference():
    """The whole model with FP8 block linears = the same model whose block linears run torchao's
    Float8Linear modules (forward hooks replacing their outputs)."""
    from neox.model.fp8 import convert_block_linears

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 16))
    p = _precision(fp8_recipe="tensorwise", **EMU)
    model, ref = _tiny_model(), _tiny_model()
    convert_block_linears(model, p, CPU)
    plan = fp8_plan(p)
    for name in sorted(ALL):
        layer = ref.get_submodule(name)
        f8 = _reference(layer, plan, None)
        layer.register_forward_hook(lambda mod, inp, out, f8=f8: f8(inp[0]))
    out, expected = model(ids), ref(ids)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    plain = _tiny_model()(ids)
    assert not torch.allclose(out, plain, atol=1e-4)


def test_fp8_on_cpu_without_the_test_switch_is_one_line_error():
    from neox.model.fp8 import convert_block_linears

    with pytest.raises(ConfigError) as err:
        convert_block_linears(_tiny_model(), _precision(fp8_recipe="rowwise"), CPU)
    msg = str(err.value)
    assert "\n" not in msg and "FP8" in msg and "8.9" in msg and "cpu" in msg


def _flat(**kw):
    return {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 16,
            "padded_vocab_size": 256, "tokenizer_type": "CharLevelTokenizer", **kw}


@pytest.mark.parametrize("key,value,words", [
    ("fp8_recipe", "blockwise", ("fp8_recipe", "tensorwise", "rowwise")),
    ("te_fp8_format", "e5m2", ("te_fp8_format", "hybrid")),
    ("te_fp8_mha", True, ("te_fp8_mha", "not implemented")),
    ("te_fp8_amax_compute_algo", "mean", ("te_fp8_amax_compute_algo", "most_recent")),
    ("te_fp8_amax_history_len", 0, ("te_fp8_amax_history_len",)),
    ("te_fp8_margin", -1, ("te_fp8_margin",)),
])
def test_fp8_config_errors_are_one_line(key, value, words):
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_flat(_flat(**{key: value}), world_size=1)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_upstream_transformer_engine_config_resolves_with_fp8(monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    a = NeoXArgs.from_ymls(["1-3B-transformer-engine.yml"], conf_dir=str(FIXTURES), world_size=1,
                           overwrite_values={"padded_vocab_size": 50304})
    p = a.precision
    assert (p.te_mha, p.te_layernorm_mlp, p.te_columnparallel, p.te_rowparallel) == (True, True, False, False)
    plan = fp8_plan(p)
    assert plan.recipe == "tensorwise" and plan.grad_dtype == "e5m2" and not plan.hp_wgrad
    assert plan.linears == ("query_key_value", "dense", "linear1", "linear2")
    assert "dynamically" in plan.note and "\n" not in plan.note
    # The run's log line: printed once at conversion.
    from neox.model.fp8 import convert_block_linears

    capsys.readouterr()
    convert_block_linears(_tiny_model(), dataclasses.replace(p, fp8_emulate=True), CPU)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neox scales each tensor dynamically" in err[0]


def test_te_format_and_wgrad_map_onto_torchao_configs():
    from torchao.float8.config import ScalingGranularity, ScalingType

    from neox.model.fp8 import float8_config

    e4m3 = float8_config(fp8_plan(_precision(te_mha=True, te_fp8_format="e4m3", **EMU)))
    assert e4m3.cast_config_grad_output.target_dtype == torch.float8_e4m3fn
    hybrid = float8_config(fp8_plan(_precision(te_mha=True, **EMU)))
    assert hybrid.cast_config_grad_output.target_dtype == torch.float8_e5m2
    assert hybrid.cast_config_input.target_dtype == hybrid.cast_config_weight.target_dtype == torch.float8_e4m3fn
    hp = float8_config(fp8_plan(_precision(te_mha=True, te_fp8_wgrad=False, **EMU)))
    assert hp.cast_config_input_for_grad_weight.scaling_type is ScalingType.DISABLED
    assert hp.cast_config_grad_output_for_grad_weight.scaling_type is ScalingType.DISABLED
    assert hp.cast_config_input.scaling_type is ScalingType.DYNAMIC
    row = float8_config(fp8_plan(_precision(fp8_recipe="rowwise", **EMU)))
    assert row.cast_config_input.scaling_granularity is ScalingGranularity.AXISWISE and row.emulate
    row_hp = fp8_plan(_precision(fp8_recipe="rowwise", te_fp8_wgrad=False, **EMU))
    assert row_hp.recipe == "rowwise_with_gw_hp"


@pytest.mark.parametrize("keys", [dict(fp8_recipe="tensorwise"), dict(fp8_recipe="rowwise"),
                                  dict(te_mha=True, te_fp8_wgrad=False)])
def test_neox_matmul_is_torchaos_without_a_split(keys):
    """neox's matmul gives torchao's bits when nothing is split (amax reductions; the input scale reused)."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    from neox.model.fp8 import _float8_matmul, _mm_config, float8_config

    config = float8_config(fp8_plan(_precision(**keys, **EMU)))
    mm = _mm_config(config)
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 48), torch.randn(40, 48)
    out, grads = [], []
    for fn in (lambda a, b: matmul_with_hp_or_float8_args.apply(a, b.t(), mm, config),
               lambda a, b: _float8_matmul().apply(a, b.t(), (mm, config, {}, None))):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(a, b)
        y.backward(torch.linspace(-2, 3, y.numel()).reshape(y.shape))
        out.append(y), grads.append((a.grad, b.grad))
    assert torch.equal(out[0], out[1])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def _backward_amaxes(matmul) -> int:
    """Full-tensor amax reductions in the compiled backward of rms_norm -> linear -> SwiGLU -> linear."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    counts = []

    def count_backward(gm, _):
        counts.append(sum(n.op == "call_function" and n.target is torch.ops.aten.max.default for n in gm.graph.nodes))
        return make_boxed_func(gm)

    def f(x, g, w1, w2):  # the producers (norm, SwiGLU) get recomputed in the backward, as Inductor does
        a, b = matmul(F.rms_norm(x, (x.shape[-1],), g, 1e-5), w1).chunk(2, -1)
        return matmul(F.silu(a) * b, w2)

    torch.manual_seed(0)
    args = [torch.randn(*s, dtype=torch.bfloat16, requires_grad=True) for s in ((2, 8, 32), (32,), (64, 32), (32, 32))]
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=count_backward,
                           partition_fn=min_cut_rematerialization_partition)
    torch.compile(f, backend=backend)(*args).sum().backward()
    torch._dynamo.reset()
    (amaxes,) = counts
    return amaxes


def test_tensorwise_backward_takes_no_second_amax_of_the_input():
    """torchao's matmul recomputes each linear's input amax in a compiled backward; neox's reuses the
    forward's scale, so its backward takes only the output gradients' amaxes (one per linear)."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    from neox.model.fp8 import _float8_matmul, _mm_config, float8_config

    config = float8_config(fp8_plan(_precision(fp8_recipe="tensorwise", **EMU)))
    mm, neox_mm = _mm_config(config), _float8_matmul()
    torchao_amaxes = _backward_amaxes(lambda x, w: matmul_with_hp_or_float8_args.apply(x, w.t(), mm, config))
    neox_amaxes = _backward_amaxes(lambda x, w: neox_mm.apply(x, w.t(), (mm, config, {}, None)))
    assert (torchao_amaxes, neox_amaxes) == (4, 2)


def test_fp8_block_compiles_and_matches_eager():
    """torch.compile of a block with FP8 linears (as pretrain compiles each block): same outputs and grads."""
    from neox.model.fp8 import convert_block_linears
    from neox.model.gpt import rotary_for

    model = _tiny_model()
    convert_block_linears(model, _precision(fp8_recipe="tensorwise", **EMU), CPU)
    block = model.layers[0]
    compiled = torch.compile(block)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    rotary = rotary_for(model.cfg, torch.arange(16).expand(2, 16))
    outs = []
    for fn in (block, compiled):
        a = x.clone().requires_grad_()
        y = fn(a, rotary)
        y.square().mean().backward()
        outs.append((y.detach(), a.grad, block.mlp.linear1.weight.grad.clone()))
        block.zero_grad(set_to_none=True)
    for eager, comp in zip(outs[0], outs[1]):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
