"""CUDA-only: the training fast path (compiled blocks, compiled loss, bf16 autocast over fp32
weights, as configs/tinyllama_1b.yml trains) against the fp32 CPU model that the CPU tests check
against transformers. Tolerances are bf16's: an 8-bit mantissa gives ~4e-3 relative rounding per
operation, accumulated over a few layers.
"""

import pytest
import torch

from neox.config.model import ModelConfig
from neox.model import GPTModel
from neox.model.loss import lm_loss
from neox.model.transformer import TransformerBlock

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cfg() -> ModelConfig:
    return ModelConfig(
        num_layers=3, hidden_size=512, num_attention_heads=8, num_kv_heads=2, attention_type="groupedquery",
        seq_length=256, max_position_embeddings=256, intermediate_size=1408, padded_vocab_size=2048,
        norm="rmsnorm", rms_norm_epsilon=1e-5, pos_emb="rotary", rotary_emb_base=10000.0, mlp_type="llama",
        activation="silu", use_bias_in_norms=False, use_bias_in_attn_linear=False, no_weight_tying=True,
        attention_config=["flash"] * 3,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bf16_params", [False, True], ids=["fp32_params", "bf16_params_master_weights"])
def test_compiled_autocast_path_matches_cpu_fp32(bf16_params):
    """bf16_params: the model as ``optimizer_master_weights`` trains it (bf16 parameters, autocast on)."""
    from neox.training.master_weights import to_half_parameters

    torch.manual_seed(0)
    cfg = _cfg()
    cpu = GPTModel(cfg)
    gpu = GPTModel(cfg, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    if bf16_params:
        to_half_parameters(gpu, torch.bfloat16)
    for module in gpu.modules():
        if isinstance(module, TransformerBlock):
            module.compile()
    ids = torch.randint(0, 2048, (2, 257))
    tokens, labels = ids[:, :-1], ids[:, 1:]
    mask = torch.ones(tokens.shape)

    ref_logits = cpu(tokens)
    ref_loss = lm_loss(ref_logits, labels, mask)
    ref_loss.backward()

    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = gpu(tokens.cuda())
        loss = torch.compile(lm_loss)(logits, labels.cuda(), mask.cuda())
    loss.backward()

    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 5e-3
    assert _rel(logits.cpu(), ref_logits.detach()) < 2e-2
    for name in ("embedding.word_embeddings.weight", "layers.1.attention.query_key_value.weight",
                 "layers.2.mlp.linear1.weight", "output_layer.weight"):
        g = dict(gpu.named_parameters())[name].grad.cpu()
        ref = dict(cpu.named_parameters())[name].grad
        assert _rel(g, ref) < 3e-2, name


def test_compiled_master_weight_adamw_matches_eager():
    """The compiled update (GPU) is the eager one: same masters, moments and bf16 weights."""
    from neox.training.master_weights import MasterWeightAdamW

    torch.manual_seed(0)
    shapes = [(512, 256), (256,), (1024, 64)]
    init = [torch.randn(s, device="cuda").bfloat16() for s in shapes]
    runs = []
    for compile in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = MasterWeightAdamW([{"params": [params[0], params[2]], "weight_decay": 0.1},
                                 {"params": [params[1]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95),
                                compile=compile)
        gen = torch.Generator(device="cuda").manual_seed(1)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen).bfloat16()
            opt.grad_scale = torch.tensor(2.0, device="cuda")
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (step + 1)
            opt.step()
            del opt.grad_scale
        runs.append((params, opt))
    (eager, opt_e), (compiled, opt_c) = runs
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(opt_c.state[b]["master"], opt_e.state[a]["master"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt_c.state[b]["exp_avg_sq"], opt_e.state[a]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert b.dtype == torch.bfloat16
        assert (b.float() - a.float()).abs().max() <= 2 ** -7 * a.float().abs().max()


def test_unset_keys_compile_and_a_restart_compiles_warm(tmp_path):
    """A GPT-NeoX-style bf16 config (no torch_compile / optimizer_master_weights keys) through
    deepy.py twice with one save dir: the first run's log says cold, the restart's says warm (its
    graphs come from Inductor's cache under {save}/.cache/torchinductor)."""
    import json
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from tests.distributed.launch import free_port
    from tests.distributed.test_train_parity import make_corpus, tiny_flat

    root = Path(__file__).resolve().parents[2]
    flat = tiny_flat(make_corpus(tmp_path), precision="bfloat16", bf16={"enabled": True},
                     zero_optimization={"stage": 1}, train_iters=3, num_gpus=1, save=str(tmp_path / "ckpt"))
    conf = tmp_path / "neox_bf16.yml"
    lines = []
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    for _ in range(2):
        conf.write_text(json.dumps({**flat, "checkpoint_factor": 1000, "master_port": free_port()}))
        out = subprocess.run([sys.executable, str(root / "deepy.py"), "train.py", str(conf)], cwd=root,
                             env={**env, "CUDA_VISIBLE_DEVICES": "0"}, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        log = out.stdout + out.stderr
        assert "torch.compile on (torch_compile unset" in log and "fp32 master weights (fast path" in log
        found = re.search(r"first step [\d.]+ s with torch\.compile \((\w[\w ]*): (\d+) compiled graphs from "
                          r"Inductor's cache, (\d+) compiled anew; cache (\S+)\)", log)
        assert found, log[-3000:]
        lines.append(found)
        # the restart trains afresh (no checkpoint to resume) with the same save dir, so the same cache
        for tag in (tmp_path / "ckpt").glob("global_step*"):
            shutil.rmtree(tag)
        (tmp_path / "ckpt" / "latest").unlink(missing_ok=True)
    cold, warm = lines
    assert cold.group(1) == "cold" and int(cold.group(3)) > 0
    assert cold.group(4).startswith(str(tmp_path / "ckpt" / ".cache" / "torchinductor"))
    assert int(warm.group(2)) > 0 and int(warm.group(3)) < int(cold.group(3))
