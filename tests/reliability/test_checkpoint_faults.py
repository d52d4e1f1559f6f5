"""Damaged checkpoints and failed saves: a one-line CheckpointError, never a silent partial load.

A DeepSpeed engine around a toy model (tests/unit/test_checkpoint.py) saves real tags; the tests
damage them (missing shards, truncated or flipped bytes, a garbage manifest or ``latest``), fill
the disk during a save, and load converter-written checkpoints of another parallel layout into a
tiny GPTModel engine. The reference for "still loads" is the weights recorded at save time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from neox.checkpoint import load_checkpoint, save_checkpoint
from neox.checkpoint.state import TrainState
from neox.errors import CheckpointError
from tests.unit.test_checkpoint import _args, init_single_rank, toy_engine, toy_run


@pytest.fixture(scope="module", autouse=True)
def _dist():
    init_single_rank()


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _saved(tmp_path: Path, steps: int = 1, **kw):
    args = _args(tmp_path, **kw)
    engine = toy_engine(seed=0)
    state = TrainState()
    toy_run(engine, state, steps)
    save_checkpoint(engine, args.checkpoint, state, steps, args_flat=args.to_flat())
    return args, _weights(engine)


def _load_error(args, **engine_kw) -> str:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(toy_engine(seed=1, **engine_kw), args.checkpoint)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "model_states_missing": (lambda d: (d / "mp_rank_00_model_states.pt").unlink(), "mp_rank_00_model_states.pt"),
    "rng_missing": (lambda d: (d / "rng_state_rank0.pt").unlink(), "rng_state_rank0.pt"),
    "model_states_truncated": (lambda d: os.truncate(d / "mp_rank_00_model_states.pt", 100), "size"),
    "model_states_flipped": (lambda d: _flip_byte(d / "mp_rank_00_model_states.pt"), "checksum"),
    "args_flipped": (lambda d: _flip_byte(d / "neox_args.json"), "neox_args.json"),
    "manifest_garbage": (lambda d: (d / "manifest.json").write_text("{not json"), "unreadable manifest"),
    "manifest_no_files": (lambda d: (d / "manifest.json").write_text("[]"), "manifest"),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_tag_is_refused(tmp_path, how):
    args, _ = _saved(tmp_path)
    damage, needle = DAMAGE[how]
    damage(Path(args.checkpoint.save) / "global_step1")
    msg = _load_error(args)
    assert needle in msg and "global_step1" in msg, msg


def test_missing_tensor_is_not_a_partial_load(tmp_path):
    args, _ = _saved(tmp_path)
    tag = Path(args.checkpoint.save) / "global_step1"
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)
    del states["module"]["2.bias"]
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    (tag / "manifest.json").unlink()  # as a converter's or DeepSpeed's own tag: nothing to verify against
    msg = _load_error(args)
    assert "model and checkpoint differ" in msg and "2.bias" in msg, msg


def test_dangling_or_garbage_latest(tmp_path):
    args, _ = _saved(tmp_path)
    save = Path(args.checkpoint.save)
    (save / "latest").write_text("global_step9")
    assert "names 'global_step9'" in _load_error(args)
    (tmp_path / "outside").mkdir()
    (save / "latest").write_text("../outside")  # exists, outside the checkpoint directory
    assert "expected a tag such as 'global_step1000'" in _load_error(args)
    (save / "latest").write_text("..")
    assert "expected a tag" in _load_error(args)
    shutil.move(save / "global_step1", save / "global_step1.partial")
    args = _args(tmp_path).__class__(checkpoint=args.checkpoint.__class__(load=str(save / "global_step1.partial")))
    assert "interrupted save" in _load_error(args)


def test_wrong_shapes_name_the_tensor(tmp_path):
    args, _ = _saved(tmp_path)
    msg = _load_error(args, width=16)
    assert "tensor 0.weight has shape [8, 4] in the checkpoint but [16, 4] in the model" in msg, msg


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
    mnt = tmp_path / "small_fs"
    if not _mount_tmpfs(mnt, "256k"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        args = _args(mnt)
        engine, state = toy_engine(seed=0, width=2000), TrainState()  # ~170 kB a tag: one fits, two don't
        toy_run(engine, state, 1)
        save_checkpoint(engine, args.checkpoint, state, 1)
        saved = _weights(engine)
        toy_run(engine, state, 1)
        with pytest.raises(CheckpointError) as err:
            save_checkpoint(engine, args.checkpoint, state, 2)
        msg = str(err.value)
        assert "\n" not in msg and "global_step2.partial: writing the checkpoint failed" in msg, msg
        assert "latest still names global_step1" in msg and "bytes free" in msg, msg
        save = Path(args.checkpoint.save)
        assert sorted(os.listdir(save)) == ["global_step1", "latest"]  # partial removed, space freed
        fresh = toy_engine(seed=3, width=2000)
        assert load_checkpoint(fresh, args.checkpoint).iteration == 1
        for name, tensor in _weights(fresh).items():
            assert torch.equal(tensor, saved[name]), name
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20)


def test_read_only_save_directory(tmp_path):
    mnt = tmp_path / "ro_fs"
    if not _mount_tmpfs(mnt, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        args = _args(mnt)
        engine, state = toy_engine(seed=0), TrainState()
        toy_run(engine, state, 1)
        save_checkpoint(engine, args.checkpoint, state, 1)
        saved = _weights(engine)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True, timeout=20)
        toy_run(engine, state, 1)
        with pytest.raises(CheckpointError, match=r"global_step2.partial: writing the checkpoint failed .*"
                                                  r"the directory is not writable.*latest still names global_step1"):
            save_checkpoint(engine, args.checkpoint, state, 2)
        elsewhere = _args(mnt / "new")  # a save directory that cannot even be created
        with pytest.raises(CheckpointError, match=r"rank 0: OSError: \[Errno 30\] Read-only file system"):
            save_checkpoint(engine, elsewhere.checkpoint, state, 2)
        fresh = toy_engine(seed=3)
        assert load_checkpoint(fresh, args.checkpoint).iteration == 1
        assert all(torch.equal(t, saved[n]) for n, t in _weights(fresh).items())
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20)


def test_full_log_disk_warns_once_and_training_goes_on(tmp_path, capsys):
    from neox.config import LoggingConfig
    from neox.metrics import MetricsLogger
    from tests.unit.test_metrics import _rec

    mnt = tmp_path / "log_fs"
    if not _mount_tmpfs(mnt, "16k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        logger = MetricsLogger(LoggingConfig(log_dir=str(mnt / "logs")), train_iters=10)
        logger.log_train(_rec(1, 5.0))
        with open(mnt / "ballast", "wb") as f:  # fill the filesystem
            try:
                f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        for it in range(2, 60):  # past the page metrics.jsonl already holds
            logger.log_train(_rec(it, 5.0))  # must not raise
        logger.close()
        err = capsys.readouterr().err
        assert err.count("cannot write") == 1 and "No space left on device" in err, err
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20)


# ---- another parallel layout ----------------------------------------------------------------


def _gpt_engine():
    from megatron_core import parallel_state
    from neox.config import NeoXArgs
    from neox.training.pretrain import build_engine, build_model

    if not parallel_state.is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, train_micro_batch_size_per_gpu=2,
                padded_vocab_size=128, optimizer={"type": "Adam", "params": {"lr": 1e-3}}, train_iters=2,
                tokenizer_type="CharLevelTokenizer")
    args = NeoXArgs.from_flat(base, world_size=1)
    model = build_model(args, torch.device("cpu"))
    engine, _ = build_engine(args, model, torch.device("cpu"))
    return base, args, engine, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_another_parallel_layout_is_refused_with_the_reshard_command(tmp_path):
    from megatron_core import parallel_state
    from neox.config import NeoXArgs
    from neox.convert import weights

    base, args, engine, full = _gpt_engine()
    try:
        for tp, pp, finetune in [(2, 0, True), (2, 0, False), (1, 1, True)]:
            out = tmp_path / f"tp{tp}pp{pp}"
            if not out.exists():
                weights.write_weights(full, args.model, out, tp, pp, progress=False)
            load_args = NeoXArgs.from_flat({**base, "load": str(out), "finetune": finetune}, world_size=1)
            with pytest.raises(CheckpointError) as err:
                load_checkpoint(engine, load_args.checkpoint)
            msg = str(err.value)
            assert "\n" not in msg and f"saved with model_parallel_size {tp}" in msg, msg
            assert "tools/reshard_checkpoint.py --num_output_shards 1 --pipe_parallel_size 0" in msg, msg
        # the same weights in this run's layout load
        weights.write_weights(full, args.model, tmp_path / "tp1pp0", 1, 0, progress=False)
        ok = NeoXArgs.from_flat({**base, "load": str(tmp_path / "tp1pp0"), "finetune": True}, world_size=1)
        assert load_checkpoint(engine, ok.checkpoint).iteration == 0
        assert all(torch.equal(v, full[k]) for k, v in engine.module.state_dict().items())
    finally:
        parallel_state.destroy_model_parallel()
