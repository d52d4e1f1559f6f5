"""GPTModelPipe (DeepSpeed PipelineModule, one stage, one process) against the plain GPTModel."""

import os

import pytest
import torch
import torch.distributed as dist

from neox.model import GPTModel, lm_loss
from tests.distributed.launch import free_port
from tests.unit.test_model import S, V, llama_cfg, neox_cfg


@pytest.fixture(scope="module")
def one_rank_world():
    if dist.is_initialized():  # a one-rank world left by an earlier test module in this process
        yield
        return
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed

    deepspeed.init_distributed("gloo")  # DeepSpeed's comm layer wraps the group just created
    yield
    dist.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_key_maps_round_trip():
    from neox.model.pipe import pipe_to_plain_key, plain_to_pipe_key

    model = GPTModel(llama_cfg(num_layers=3))
    for name in model.state_dict():
        idx, sub = plain_to_pipe_key(name, 3)
        assert pipe_to_plain_key(idx, sub, 3) == name
    assert plain_to_pipe_key("layers.0.mlp.linear1.weight", 3) == (2, "mlp.linear1.weight")
    assert plain_to_pipe_key("final_norm.weight", 3) == (6, "weight")
    assert plain_to_pipe_key("output_layer.weight", 3) == (7, "weight")


@pytest.mark.parametrize("make", [lambda: llama_cfg(checkpoint_activations=True), lambda: neox_cfg(gpt_j_residual=False, pos_emb="learned")])
def test_pipe_module_matches_plain_model(one_rank_world, make):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from neox.model.pipe import GPTModelPipe

    cfg = make()
    plain = GPTModel(cfg, seed=21)
    pipe = GPTModelPipe(cfg, topology=PipeModelDataParallelTopology(1, 1, 1), seed=21)
    pipe_params = dict(pipe.plain_named_parameters())
    # Same seed, same full weights, whichever form builds them.
    assert set(pipe_params) == {n for n, _ in plain.named_parameters()}
    for n, p in plain.named_parameters():
        assert torch.equal(pipe_params[n], p), n

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, S + 1), generator=g)
    pos = torch.arange(S).expand(2, S)
    mask = (torch.rand(2, S, generator=g) > 0.3).float()
    ref_logits = plain(ids[:, :-1], pos)
    ref_loss = lm_loss(ref_logits, ids[:, 1:], mask)
    ref_loss.backward()
    logits = pipe((ids[:, :-1], pos))
    loss = pipe.loss_fn(logits, (ids[:, 1:], mask))
    loss.backward()
    assert torch.allclose(logits, ref_logits, atol=1e-6, rtol=0)
    assert abs(loss.item() - ref_loss.item()) < 1e-6
    for n, p in plain.named_parameters():
        assert torch.allclose(pipe_params[n].grad, p.grad, atol=1e-6, rtol=1e-5), n
