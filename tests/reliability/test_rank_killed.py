"""SIGKILL of one rank in the middle of a training step, through the real launcher.

``python deepy.py`` starts two CPU ranks; rank 1 kills itself (SIGKILL, no handler runs) inside the
forward pass of iteration 5, after the save at iteration 4. The launcher must end the other rank
and exit non-zero (no hang), ``latest`` must name global_step4 and verify, and the same command with
``load`` set resumes from it and finishes. A rank SIGKILLed in the middle of a *save* is covered by
tests/distributed/test_checkpoint_dist.py (two ranks) and tests/unit/test_checkpoint_crash.py
(inside DeepSpeed's torch.save and just before the manifest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from neox.checkpoint import local
from neox.checkpoint import manifest as mf
from tests.distributed.launch import free_port
from tests.distributed.test_train_parity import make_corpus, tiny_flat

ROOT = Path(__file__).resolve().parents[2]

USER_SCRIPT = '''
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
if os.environ.get("RANK") == "1" and os.environ.get("NEOX_TEST_KILL_AT"):
    import neox.model.loss as loss_mod
    original, calls, kill_at = loss_mod.lm_loss, [0], int(os.environ["NEOX_TEST_KILL_AT"])
    def lm_loss(*args):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args)
    loss_mod.lm_loss = lm_loss
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
'''


SECRETS = {"WANDB_API_KEY": "wandbkey-launcher-SECRET-0123456789ab", "AWS_SECRET_ACCESS_KEY": "aws-launcher-SECRET-zyxw"}


def _deepy(script: Path, conf: Path, kill_at: int | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **SECRETS}
    env.pop("NEOX_TEST_KILL_AT", None)
    if kill_at:
        env["NEOX_TEST_KILL_AT"] = str(kill_at)
    return subprocess.run([sys.executable, str(ROOT / "deepy.py"), str(script), str(conf)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def test_rank_sigkilled_mid_step_then_resume(tmp_path):
    prefix = make_corpus(tmp_path)
    save = tmp_path / "save"
    flat = tiny_flat(prefix, train_iters=6, checkpoint_factor=2, save=str(save), load=str(save),
                     train_batch_size=4, train_micro_batch_size_per_gpu=2, num_gpus=2, master_port=free_port(),
                     log_dir=str(tmp_path / "logs"))
    conf = tmp_path / "tiny.yml"
    conf.write_text(json.dumps(flat))
    script = tmp_path / "train_with_fault.py"
    script.write_text(USER_SCRIPT.format(root=str(ROOT), train=str(ROOT / "train.py")))

    killed = _deepy(script, conf, kill_at=5)  # rank 1's 5th forward pass: iteration 5
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert local.read_latest(str(save)) == "global_step4"
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("global_step")) == ["global_step2",
                                                                                        "global_step4"]
    assert mf.verify_tag(str(save / "global_step4")) is not None  # whole, checksums match

    resumed = _deepy(script, conf, kill_at=None)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert local.read_latest(str(save)) == "global_step6"
    train_records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    iterations = [r["iteration"] for r in train_records if "split" not in r]
    assert iterations == [1, 2, 3, 4, 5, 6]  # the killed run never logged iteration 5; the resume did, once

    # the ranks had the secrets (the launcher passes the W&B key on); neither run printed or stored them
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    for secret in SECRETS.values():
        for run in (killed, resumed):
            assert secret not in run.stdout + run.stderr
        assert not [p for p in files if secret.encode() in p.read_bytes()]
