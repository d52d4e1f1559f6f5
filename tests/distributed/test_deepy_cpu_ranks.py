"""deepy.py for real on a machine without GPUs: `num_gpus: 2` starts two CPU ranks through DeepSpeed's
runner; both receive the identical resolved config (and the W&B key), and form one gloo world."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

USER_SCRIPT = '''
import hashlib, json, os, sys
from neox.handoff import rank_args
import torch.distributed as dist

args = rank_args()
flat = args.to_flat()
digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
dist.init_process_group("gloo")
digests = [None] * dist.get_world_size()
dist.all_gather_object(digests, digest)
record = {"rank": dist.get_rank(), "world": dist.get_world_size(), "local_rank": os.environ.get("LOCAL_RANK"),
          "flat": flat, "digests": digests, "wandb_key": os.environ.get("WANDB_API_KEY"),
          "argv_has_yaml": any(a.endswith(".yml") for a in sys.argv)}
out = os.path.join(os.environ["NEOX_TEST_OUT"], f"rank{dist.get_rank()}.json")
with open(out, "w") as f:
    json.dump(record, f)
dist.destroy_process_group()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks_receive_identical_config(tmp_path, monkeypatch):
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    conf = tmp_path / "tiny.yml"
    conf.write_text(
        '{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,\n'
        f' "num_gpus": 2, "master_port": {free_port()}, "train_micro_batch_size_per_gpu": 3,'
        ' "gradient_accumulation_steps": 2, "bias_gelu_fusion": true}\n'
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "NEOX_TEST_OUT": str(out_dir), "CUDA_VISIBLE_DEVICES": "", "WANDB_API_KEY": "test-key-42",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "deepy.py"), str(script), str(conf)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    # the reference: the config resolved here, in the launching process, as deepy.py resolved it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    from neox.config import NeoXArgs

    expected = NeoXArgs.from_ymls([str(conf)]).to_flat()
    for rank, rec in enumerate(records):
        assert rec["rank"] == rank and rec["world"] == 2 and rec["local_rank"] == str(rank)
        assert rec["flat"] == json.loads(json.dumps(expected))
        assert rec["digests"][0] == rec["digests"][1]
        assert rec["wandb_key"] == "test-key-42" and not rec["argv_has_yaml"]
    assert records[0]["flat"]["train_batch_size"] == 3 * 2 * 2
    assert "test-key-42" not in result.stdout + result.stderr
