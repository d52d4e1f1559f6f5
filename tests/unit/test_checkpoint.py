"""Checkpoint save/load through a real DeepSpeed engine wrapping a toy model (one gloo rank).

The reference for "exact resume" is the same toy run without interruption; the toy draws its
batches from Python's and NumPy's RNGs and uses dropout (torch RNG), so a resume that forgot any
of them, the optimizer moments or the LR schedule would give different losses.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from neox.checkpoint import load_checkpoint, local, save_checkpoint
from neox.checkpoint import manifest as mf
from neox.checkpoint.state import TrainState
from neox.config.run import CheckpointConfig
from neox.errors import CheckpointError

# ---- toy run (also used by tests/distributed/test_checkpoint*.py) ----------------------------


@dataclass(frozen=True)
class ToyArgs:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_flat(self) -> dict[str, Any]:
        return {"save": self.checkpoint.save, "wandb_api_key": "sekrit", "tokenizer_type": "GPT2BPETokenizer"}


def init_single_rank() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from tests.distributed.launch import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)


def toy_engine(seed: int = 0, zero: int = 0, width: int = 8, dp: int = 1):
    """A DeepSpeed engine around a 2-layer MLP with dropout, AdamW and a decaying LR schedule."""
    from neox.training.engine import initialize

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Dropout(0.2), torch.nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4 * dp,
           "zero_optimization": {"stage": zero}, "steps_per_print": 10**9}
    return initialize(model, opt, cfg, lr_scheduler=sched)


def toy_step(engine) -> float:
    """One training step on a batch drawn from Python's, NumPy's and torch's RNGs."""
    scale = random.random()
    x = torch.from_numpy(np.random.rand(4, 4).astype(np.float32)) * scale + torch.randn(4, 4)
    loss = (engine(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def toy_run(engine, state: TrainState, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(toy_step(engine))
        state.iteration += 1
        state.consumed_train_samples += 4
    return losses


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fixed_batch_loss(engine) -> float:
    engine.eval()
    with torch.no_grad():
        x = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 16
        loss = engine(x).pow(2).mean().item()
    engine.train()
    return loss


# ---- tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _dist():
    init_single_rank()
    yield


def _args(tmp_path, **kw) -> ToyArgs:
    return ToyArgs(CheckpointConfig(save=str(tmp_path / "ckpt"), load=str(tmp_path / "ckpt"), **kw))


def test_exact_resume_and_layout(tmp_path):
    args = _args(tmp_path, checkpoint_validation_with_forward_pass=True)
    seed_all(1)
    ref = toy_run(toy_engine(seed=0), TrainState(), 6)

    seed_all(1)
    engine, state = toy_engine(seed=0), TrainState()
    first = toy_run(engine, state, 3)
    tag_dir = save_checkpoint(engine, args.checkpoint, state, state.iteration, args_flat=args.to_flat(),
                              validation_fn=lambda: fixed_batch_loss(engine))
    expected_vloss = fixed_batch_loss(engine)
    seed_all(99)  # scramble every RNG: the load must put them back
    engine2 = toy_engine(seed=7)
    loaded = load_checkpoint(engine2, args.checkpoint, validation_fn=lambda: fixed_batch_loss(engine2))
    assert loaded == TrainState(iteration=3, consumed_train_samples=12)
    rest = toy_run(engine2, loaded, 3)
    assert first + rest == ref  # bitwise: fp32 on CPU

    # layout: DeepSpeed's files, our RNG file, args without secrets, manifest, latest
    assert tag_dir == os.path.join(args.checkpoint.save, "global_step3")
    with open(os.path.join(args.checkpoint.save, "latest")) as f:
        assert f.read() == "global_step3"
    names = sorted(os.listdir(tag_dir))
    assert names == ["manifest.json", "mp_rank_00_model_states.pt", "neox_args.json", "rng_state_rank0.pt"]
    saved_args = json.load(open(os.path.join(tag_dir, "neox_args.json")))
    assert saved_args["wandb_api_key"] == "<redacted>" and saved_args["tokenizer_type"] == "GPT2BPETokenizer"
    man = mf.read_manifest(tag_dir)
    assert man["iteration"] == 3 and man["layout"]["data_parallel_size"] == 1
    assert man["validation_loss"] == expected_vloss
    for rel, entry in man["files"].items():  # sizes and checksums recomputed independently
        data = open(os.path.join(tag_dir, rel), "rb").read()
        assert entry["size"] == len(data)
    assert not os.path.exists(tag_dir + local.PARTIAL_SUFFIX)


def test_manifest_detects_corruption_and_validation_mismatch(tmp_path):
    args = _args(tmp_path, checkpoint_validation_with_forward_pass=True)
    seed_all(2)
    engine, state = toy_engine(), TrainState()
    toy_run(engine, state, 1)
    tag_dir = save_checkpoint(engine, args.checkpoint, state, 1, validation_fn=lambda: fixed_batch_loss(engine))
    # a fixed-batch loss that differs after load is reported with both values
    engine2 = toy_engine(seed=5)
    with pytest.raises(CheckpointError, match=r"loss of the fixed batch was .* at save, 123.0 after load"):
        load_checkpoint(engine2, args.checkpoint, validation_fn=lambda: 123.0)
    # flip one byte (same size): the checksum names the file
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: xxh3_128 checksum|blake2b checksum"):
        load_checkpoint(toy_engine(), args.checkpoint)
    os.remove(path)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: missing"):
        load_checkpoint(toy_engine(), args.checkpoint)


def test_finetune_loads_weights_only(tmp_path):
    args = _args(tmp_path)
    seed_all(3)
    engine, state = toy_engine(seed=0), TrainState()
    toy_run(engine, state, 3)
    save_checkpoint(engine, args.checkpoint, state, 3)
    fresh = toy_engine(seed=11)
    ft = _args(tmp_path, finetune=True)
    loaded = load_checkpoint(fresh, ft.checkpoint)
    assert loaded == TrainState()
    for a, b in zip(engine.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a, b)
    assert fresh.optimizer.state_dict()["state"] == {}  # fresh moments
    assert fresh.global_steps == 0 and fresh.lr_scheduler.last_epoch == 0


def test_shape_mismatch_names_tensor(tmp_path):
    args = _args(tmp_path)
    engine = toy_engine(width=8)
    save_checkpoint(engine, args.checkpoint, TrainState(iteration=1), 1)
    with pytest.raises(CheckpointError, match=r"tensor 0\.weight has shape \[8, 4\] in the checkpoint but \[6, 4\]"):
        load_checkpoint(toy_engine(width=6), args.checkpoint)


def test_keep_last_n_and_chosen_iteration(tmp_path):
    args = _args(tmp_path, keep_last_n_checkpoints=2)
    engine, state = toy_engine(), TrainState()
    for it in (1, 2, 3, 4):
        state.iteration = it
        save_checkpoint(engine, args.checkpoint, state, it)
    assert [t for _, t in local.list_tags(args.checkpoint.save)] == ["global_step3", "global_step4"]
    state.consumed_train_samples = 99  # re-saving an existing iteration replaces it whole
    save_checkpoint(engine, args.checkpoint, state, 4)
    assert sorted(os.listdir(args.checkpoint.save)) == ["global_step3", "global_step4", "latest"]
    assert load_checkpoint(toy_engine(), args.checkpoint).consumed_train_samples == 99
    # load a chosen iteration by naming its directory
    pick = ToyArgs(CheckpointConfig(load=os.path.join(args.checkpoint.save, "global_step3")))
    assert load_checkpoint(toy_engine(), pick.checkpoint).iteration == 3
    # nothing to load
    assert load_checkpoint(toy_engine(), CheckpointConfig(load=str(tmp_path / "none"))) is None


def test_zero_stage_change_keeps_weights_and_schedule(tmp_path, caplog):
    args = _args(tmp_path)
    seed_all(4)
    engine, state = toy_engine(zero=0), TrainState()
    toy_run(engine, state, 2)
    save_checkpoint(engine, args.checkpoint, state, 2)
    other = toy_engine(seed=3, zero=1)
    with caplog.at_level("WARNING"):
        loaded = load_checkpoint(other, args.checkpoint)
    assert "ZeRO stage 0 in the checkpoint, 1 now" in caplog.text
    assert loaded.iteration == 2 and other.global_steps == 2
    assert other.lr_scheduler.last_epoch == engine.lr_scheduler.last_epoch
    for a, b in zip(engine.module.parameters(), other.module.parameters()):
        assert torch.equal(a, b)


def test_redact_and_atomic_write(tmp_path):
    flat = {"wandb_api_key": "x", "s3_path": "s3://u:p@bucket/x", "tokenizer_type": "HF", "token_x": None}
    out = local.redact(flat)
    assert out == {"wandb_api_key": "<redacted>", "s3_path": "s3://<redacted>@bucket/x", "tokenizer_type": "HF",
                   "token_x": None}
    p = tmp_path / "latest"
    mf.atomic_write_text(str(p), "global_step1")
    mf.atomic_write_text(str(p), "global_step2")
    assert p.read_text() == "global_step2" and os.listdir(tmp_path) == ["latest"]


@pytest.mark.parametrize("zero", [0, 1])
def test_no_save_optim_and_rng(tmp_path, zero, caplog):
    args = _args(tmp_path, no_save_optim=True, no_save_rng=True)
    engine, state = toy_engine(zero=zero), TrainState()
    toy_run(engine, state, 2)
    tag_dir = save_checkpoint(engine, args.checkpoint, state, 2)
    names = os.listdir(tag_dir)
    assert not any("optim_states" in n or n.startswith("rng_state") for n in names)
    saved = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), weights_only=False)
    assert saved["optimizer"] is None and mf.read_manifest(tag_dir)["optimizer"] is False
    other = toy_engine(seed=4, zero=zero)
    with caplog.at_level("WARNING"):
        assert load_checkpoint(other, args.checkpoint).iteration == 2
    assert "saved without optimizer state" in caplog.text and other.lr_scheduler.last_epoch == 2
    for a, b in zip(engine.module.parameters(), other.module.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("zero", [0, 1])
def test_foreign_checkpoint_without_optimizer(tmp_path, zero):
    """A DeepSpeed checkpoint with no manifest and no optimizer state (as converters write them)."""
    root = str(tmp_path / "foreign")
    engine = toy_engine(zero=zero)
    toy_run(engine, TrainState(), 1)
    engine.save_checkpoint(root, "global_step1", {"optimizer": None})
    with open(os.path.join(root, "latest"), "w") as f:  # as DeepSpeed's own save writes it
        f.write("global_step1")
    for name in os.listdir(os.path.join(root, "global_step1")):
        if "optim_states" in name:
            os.remove(os.path.join(root, "global_step1", name))
    with pytest.raises(CheckpointError, match="no usable optimizer state .* set finetune: true"):
        load_checkpoint(toy_engine(zero=zero), CheckpointConfig(load=root))
    other = toy_engine(seed=3, zero=zero)
    state = load_checkpoint(other, CheckpointConfig(load=root, no_load_optim=True))
    assert state.iteration == 1  # from DeepSpeed's global_steps
    for a, b in zip(engine.module.parameters(), other.module.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("zero", [2, 3])
def test_exact_resume_zero23_and_finetune_from_chosen_tag(tmp_path, zero):
    import deepspeed

    args = _args(tmp_path)
    seed_all(6)
    ref = toy_run(toy_engine(seed=0, zero=zero), TrainState(), 4)
    seed_all(6)
    engine, state = toy_engine(seed=0, zero=zero), TrainState()
    first = toy_run(engine, state, 2)
    save_checkpoint(engine, args.checkpoint, state, 2)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        at2 = [p.detach().clone() for p in engine.module.parameters()]
    seed_all(42)
    engine2 = toy_engine(seed=7, zero=zero)
    assert first + toy_run(engine2, load_checkpoint(engine2, args.checkpoint), 2) == ref
    save_checkpoint(engine2, args.checkpoint, TrainState(iteration=4), 4)
    # finetune from the older tag (ZeRO-3 re-reads 'latest' internally: neox points it at the chosen tag)
    ft = toy_engine(seed=8, zero=zero)
    pick = ToyArgs(CheckpointConfig(load=os.path.join(args.checkpoint.save, "global_step2"), finetune=True))
    assert load_checkpoint(ft, pick.checkpoint) == TrainState()
    with deepspeed.zero.GatheredParameters(list(ft.module.parameters())):
        assert all(torch.equal(p, q) for p, q in zip(ft.module.parameters(), at2))
    left = sorted(n for n in os.listdir(args.checkpoint.save) if not n.endswith(".py"))  # DeepSpeed's zero_to_*.py
    assert left == ["global_step2", "global_step4", "latest"]


def test_prune_spares_latest_and_pending_uploads(tmp_path):
    for n in (1, 2, 3, 4, 10):
        (tmp_path / f"global_step{n}").mkdir()
    (tmp_path / "global_step5.partial").mkdir()
    (tmp_path / "s3_cache").mkdir()
    (tmp_path / "latest").write_text("global_step2")
    removed = local.prune(str(tmp_path), 1, protect={"global_step1"})
    assert removed == ["global_step3", "global_step4"]  # numeric order: step10 is the newest
    assert sorted(os.listdir(tmp_path)) == ["global_step1", "global_step10", "global_step2", "global_step5.partial",
                                            "latest", "s3_cache"]
