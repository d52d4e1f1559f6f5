"""The loop reads a step's loss back only after queuing the next one (settling before logs, saves,
evaluations and the end); the profile keys write their outputs. Reference: the same run with a log
line, hence a read-back, after every iteration."""

from __future__ import annotations

import json
import math

import torch

from neox.checkpoint import local
from neox.training.profiler import kernel_class, largest_gaps, summarize
from neox.training.readback import PendingScalars
from tests.distributed.test_train_parity import run_pretrain, tiny_flat
from tests.reliability import test_training_faults as faults

_dist, corpus = faults._dist, faults.corpus  # fixtures: one gloo rank, the char corpus


def _records(log_dir) -> list[dict]:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "split" not in r]


def test_sparse_logging_settles_every_step_in_order(tmp_path, corpus):
    every = run_pretrain(tiny_flat(corpus, train_iters=7, log_dir=str(tmp_path / "every"), log_interval=1), 1)
    save = tmp_path / "save"
    sparse = run_pretrain(tiny_flat(corpus, train_iters=7, log_dir=str(tmp_path / "sparse"), log_interval=3,
                                 save=str(save), checkpoint_factor=4), 1)
    assert len(every.losses) == 7  # one record per iteration: each step's own loss
    assert sparse.state.iteration == 7 and sparse.state.consumed_train_samples == 28
    recs = _records(tmp_path / "sparse")
    assert [r["iteration"] for r in recs] == [3, 6]
    # each sparse record is the mean of the same steps' losses: every step settled, in order
    for rec, window in zip(recs, (every.losses[0:3], every.losses[3:6])):
        assert math.isclose(rec["lm_loss"], sum(window) / 3, rel_tol=1e-9)
        assert rec["elapsed_ms_per_iteration"] > 0 and rec["tokens_per_sec"] > 0
    assert sorted(p.name for p in save.iterdir()) == ["global_step4", "global_step7", "latest"]
    # the iteration-4 checkpoint holds the weights after 4 steps, not after the 5th (already queued) step
    ref_save = tmp_path / "ref_save"
    run_pretrain(tiny_flat(corpus, train_iters=4, lr_decay_iters=7, save=str(ref_save), checkpoint_factor=4), 1)
    name = "mp_rank_00_model_states.pt"
    got = torch.load(save / "global_step4" / name, weights_only=True)["module"]
    ref = torch.load(ref_save / "global_step4" / name, weights_only=True)["module"]
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert local.read_latest(str(save)) == "global_step7"


def test_profile_keys_write_trace_table_and_summary(tmp_path, corpus):
    logs = tmp_path / "logs"
    run_pretrain(tiny_flat(corpus, train_iters=4, log_dir=str(logs), profile=True, profile_step_start=1,
                        profile_step_stop=3), 1)
    out = logs / "profile"
    assert (out / "trace_rank0.json.gz").stat().st_size > 0
    assert "Self CPU" in (out / "kernels_rank0.txt").read_text()
    summary = json.loads((out / "summary_rank0.json").read_text())
    assert summary["iterations"] == 2  # no GPU here: no kernels to classify


def test_kernel_summary_from_records():
    kernels = [("sm90_xmma_gemm_bf16", 0.0, 600.0), ("triton_per_fused_rms_norm_0", 600.0, 700.0),
               ("cudnn_generated_fort_native_sdpa_sm90", 800.0, 1000.0), ("multi_tensor_apply_kernel", 1000.0, 1100.0)]
    s = summarize(kernels, iterations=1)
    assert s["window_ms_per_iter"] == 1.1 and s["busy_ms_per_iter"] == 1.0
    assert s["idle_fraction"] == round(100 / 1100, 4)
    assert s["ms_per_iter"] == {"gemm": 0.6, "attention": 0.2, "compiled": 0.1, "optimizer": 0.1}
    assert kernel_class("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "communication"
    assert kernel_class("Memcpy DtoH (Device -> Pinned)") == "copy"


def test_largest_gaps_name_the_host_ops_at_the_gap():
    kernels = [("k1", 0.0, 100.0), ("k2", 600.0, 700.0), ("k3", 700.0, 800.0), ("k4", 1000.0, 1100.0)]
    cpu = [("train_step", 0.0, 2000.0), ("aten::item", 550.0, 601.0), ("aten::mm", 950.0, 960.0)]
    gaps = largest_gaps(kernels, cpu, top=2)
    assert [g["idle_ms"] for g in gaps] == [0.5, 0.2]
    assert gaps[0]["next_kernel"] == "k2" and gaps[0]["host_ops"] == ["train_step", "aten::item"]
    assert gaps[1]["host_ops"] == ["train_step", "aten::mm"]


def test_pending_scalars_read_floats_and_none():
    values = PendingScalars(loss=torch.tensor(2.5), grad_norm=None, other=1.0).get()
    assert values == {"loss": 2.5, "grad_norm": None, "other": 1.0}
