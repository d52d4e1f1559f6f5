"""Tensor parallel 2 (gloo) against tensor parallel 1 in the test process: weights, logits, gradients."""

import torch
import torch.nn.functional as F

from tests.distributed.launch import run_distributed
from tests.unit.test_model import S, V, llama_cfg, neox_cfg

SEED = 11
# LLaMA (GQA, SwiGLU, untied); NeoX classic with gpt_j residual and partial rotary (tied);
# NeoX sequential with learned positions and biases (tied).
VARIANTS = (("llama", llama_cfg()), ("neox_gptj", neox_cfg()), ("neox", neox_cfg(pos_emb="learned", gpt_j_residual=False)))


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (2, S + 1), generator=g)
    mask = (torch.rand(2, S, generator=g) > 0.2).float()
    return ids[:, :-1], ids[:, 1:], mask


def _gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _full_state(model, cfg, grads: bool = False) -> dict:
    from megatron_core.tensor_parallel.utils import unshard
    from neox.model.layout import model_layout

    layout = model_layout(cfg)
    out = {}
    for n, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        out[n] = unshard(_gather(t), layout[n].split)
    return out


def _to_numpy(obj):
    """Tensors in a spawned rank's result go through shared memory that dies with the process."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().numpy().copy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    return obj


def _t(a) -> torch.Tensor:
    return torch.from_numpy(a)


def _run(cfg, sequence_parallel=False):
    from neox.model import GPTModel, lm_loss

    ids, labels, mask = _batch()
    model = GPTModel(cfg, seed=SEED, sequence_parallel=sequence_parallel)
    logits = model(ids)
    loss = lm_loss(logits, labels, mask)
    loss.backward()
    return model, logits, loss


def _tp2_checks(rank, world):
    from megatron_core import parallel_state as ps
    from megatron_core.tensor_parallel import model_parallel_manual_seed, vocab_parallel_cross_entropy

    ps.initialize_model_parallel(2, 1)
    out = {}
    for name, cfg in VARIANTS:
        model, logits, loss = _run(cfg)
        full_logits = torch.cat(_gather(logits.detach()), dim=-1)
        out[name] = dict(weights=_full_state(model, cfg), grads=_full_state(model, cfg, grads=True),
                         logits=full_logits, loss=loss.item())
        if name == "llama":
            _, labels, _ = _batch()
            ours = vocab_parallel_cross_entropy(logits.detach(), labels)
            ref = F.cross_entropy(full_logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(labels.shape)
            out["ce_err"] = (ours - ref).abs().max().item()
            sp_model, sp_logits, sp_loss = _run(cfg, sequence_parallel=True)
            out["sp_logits_err"] = (sp_logits - logits).abs().max().item()
            out["sp_grad_err"] = max((a.grad - b.grad).abs().max().item()
                                     for a, b in zip(sp_model.parameters(), model.parameters()))
    # Checkpointing with attention and hidden dropout: the recomputation must redraw the same masks,
    # including those from the per-rank model-parallel stream.
    grads = []
    for ckpt in (False, True):
        model_parallel_manual_seed(99)
        cfg = llama_cfg(checkpoint_activations=ckpt, attention_dropout=0.2, hidden_dropout=0.1)
        model, _, _ = _run(cfg)
        grads.append([p.grad.clone() for p in model.parameters()])
    out["ckpt_equal"] = all(torch.equal(a, b) for a, b in zip(*grads))
    ps.destroy_model_parallel()
    return _to_numpy(out)


def test_tensor_parallel_2_matches_1():
    results = run_distributed(_tp2_checks, 2)
    for name, cfg in VARIANTS:
        ref_model, ref_logits, ref_loss = _run(cfg)
        for r in results:
            got = r[name]
            for n, p in ref_model.named_parameters():
                assert torch.equal(_t(got["weights"][n]), p.detach()), f"{name} weight {n}"
                assert torch.allclose(_t(got["grads"][n]), p.grad, atol=1e-6, rtol=1e-4), f"{name} grad {n}"
            assert (_t(got["logits"]) - ref_logits.detach()).abs().max().item() < 1e-5
            assert abs(got["loss"] - ref_loss.item()) < 1e-5
    for r in results:
        assert r["ce_err"] < 1e-5
        assert r["sp_logits_err"] < 1e-5 and r["sp_grad_err"] < 1e-5
        assert r["ckpt_equal"]
