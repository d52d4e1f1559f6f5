"""MetricsLogger: console line, metrics.jsonl fields (DESIGN §4), TensorBoard events, offline W&B."""

import json
import math

from neox.checkpoint.state import TrainState
from neox.config import LoggingConfig
from neox.metrics import TRAIN_FIELDS, MetricsLogger, console_line, scrub_secrets

DESIGN_FIELDS = {  # DESIGN.md §4, written out independently of neox.metrics
    "iteration", "lm_loss", "lr", "grad_norm", "loss_scale", "samples_per_sec", "tokens_per_sec",
    "tflops_per_gpu", "mfu", "consumed_samples", "consumed_tokens", "skipped_iterations",
    "nan_iterations", "max_memory_gib", "elapsed_ms_per_iteration",
}


def _rec(it, loss):
    return {"iteration": it, "lm_loss": loss, "lr": 1e-3, "grad_norm": 0.5, "loss_scale": 1.0,
            "samples_per_sec": 10.0, "tokens_per_sec": 320.0, "tflops_per_gpu": 0.01, "mfu": None,
            "consumed_samples": 4 * it, "consumed_tokens": 128 * it, "skipped_iterations": 0,
            "nan_iterations": 0, "max_memory_gib": 0.3, "elapsed_ms_per_iteration": 12.5}


def test_every_design_field_is_logged(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = LoggingConfig(log_dir=str(tmp_path / "logs"), tensorboard_dir=str(tmp_path / "tb"), use_wandb=True,
                        wandb_project="neox-test")
    logger = MetricsLogger(cfg, train_iters=10, run_config={"lr": 1e-3, "wandb_api_key": "sekrit"})
    logger.log_train(_rec(1, 5.0))
    logger.log_train(_rec(2, float("nan")))
    logger.log_eval("validation", 2, 4.5)
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert DESIGN_FIELDS <= set(TRAIN_FIELDS)
    assert DESIGN_FIELDS <= set(lines[0]) and DESIGN_FIELDS <= set(lines[1])
    assert lines[1]["lm_loss"] is None  # NaN is not JSON
    assert lines[2]["split"] == "validation" and lines[2]["lm_loss_ppl"] == math.exp(4.5)
    out = capsys.readouterr().out
    assert "iteration        1/      10" in out and "lm_loss: 5.000000E+00" in out
    assert "validation results at iteration 2" in out
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert runs, list((tmp_path / "logs").rglob("*"))
    assert not any("sekrit" in p.read_text(errors="ignore") for p in runs[0].rglob("*.yaml"))


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(LoggingConfig(log_dir=str(tmp_path)), enabled=False)
    logger.log_train(_rec(1, 1.0))
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_scrub_and_console_line():
    assert scrub_secrets({"a": {"aws_secret_access_key": "x"}, "b": 1}) == {"a": {"aws_secret_access_key": "***"}, "b": 1}
    line = console_line({**_rec(3, 2.0), "timers_ms": {"forward": 1.0}}, 10)
    assert "MFU: n/a" in line and "forward: 1.0" in line


def test_train_state_round_trip():
    s = TrainState(iteration=3, consumed_train_samples=12, consumed_tokens=384, nan_iters=1)
    assert TrainState.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert TrainState.from_dict({"iteration": 2, "unknown": 5}) == TrainState(iteration=2)


def test_wandb_init_all_ranks_starts_a_run_on_other_ranks(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("WANDB_MODE", "offline")
    import neox.metrics

    # rank 1 of a run (an earlier test in this process may hold a torch.distributed world of one)
    monkeypatch.setattr(neox.metrics, "_rank", lambda: 1)
    cfg = LoggingConfig(log_dir=str(tmp_path / "logs"), use_wandb=True, wandb_project="neox-test",
                        wandb_init_all_ranks=True, wandb_run_name="run")
    assert MetricsLogger(dataclasses.replace(cfg, wandb_init_all_ranks=False), enabled=False).wandb is None
    logger = MetricsLogger(cfg, train_iters=10, enabled=False)  # a rank that owns no writers
    assert logger.wandb is not None and logger.wandb.name == "run-rank1"
    logger.log_train({**_rec(1, 5.0), "param_norms": {"final_norm.weight": 2.0}})
    logger.close()
    assert not (tmp_path / "logs" / "metrics.jsonl").exists()  # the other writers stay on rank 0
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*"))


def test_norm_tables_go_to_the_writers_under_gpt_neox_names():
    from neox.metrics import _scalars

    out = _scalars("train", {**_rec(1, 5.0), "param_norms": {"a.weight": 2.0}, "grad_norms": {"a.weight": 0.5},
                              "param_norm": 2.0})
    assert out["parameter_norms/a.weight"] == 2.0 and out["gradient_norms/a.weight"] == 0.5
    assert out["train/param_norm"] == 2.0
