"""One DeepSpeed boundary: a scan of neox's and megatron_core's syntax trees shows that only
neox/training/engine.py imports DeepSpeed, reaches into a DeepSpeed engine's attributes, or decides
pipeline-or-not; and the boundary's Engine gives what DeepSpeed's own engine says (reference:
``deepspeed.initialize`` called directly)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BOUNDARY = "neox/training/engine.py"
# GPTModelPipe *is* a DeepSpeed PipelineModule of LayerSpecs (DESIGN.md: model/pipe.py): the model
# module defines it, and only engine.py runs it.
IMPORTS_ALLOWED = {BOUNDARY, "neox/model/pipe.py"}
# attributes of DeepSpeed engines and optimizers outside their public training API
ENGINE_INTERNALS = {"checkpoint_engine", "_config", "enable_backward_allreduce", "num_stages", "mp_world_size",
                    "dp_world_size", "seq_dp_world_size", "grid", "loss_scale_config", "cur_scale",
                    "global_samples", "skipped_steps", "_ds", "_take_model_step"}
STRINGS = ("/dev/shm", "deepspeed_allreduce_buffer", "ds_to_universal")
# DeepSpeed's names that torch-free code needs too (the launcher) live in the config-dict module
STRINGS_ALLOWED = {BOUNDARY, "neox/config/deepspeed.py"}


def _sources() -> list[tuple[str, ast.AST]]:
    files = sorted([*ROOT.glob("neox/**/*.py"), *ROOT.glob("megatron_core/**/*.py")])
    return [(str(p.relative_to(ROOT)), ast.parse(p.read_text(), str(p))) for p in files]


def _is_engine_name(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "engine" in name.lower()


def _problems(rel: str, tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mods = [node.module or ""]
        else:
            mods = []
        if any(m == "deepspeed" or m.startswith("deepspeed.") for m in mods) and rel not in IMPORTS_ALLOWED:
            out.append(f"{where}: imports {mods}")
        if rel == BOUNDARY:
            continue
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_INTERNALS:
            out.append(f"{where}: .{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "setattr", "hasattr") and node.args and _is_engine_name(node.args[0]):
            out.append(f"{where}: {node.func.id}(engine, ...)")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__setattr__"
                and node.args and _is_engine_name(node.args[0])):
            out.append(f"{where}: object.__setattr__(engine, ...)")
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and any(s in node.value for s in STRINGS)
                and rel not in STRINGS_ALLOWED):
            out.append(f"{where}: {node.value[:40]!r}")
        if (rel.startswith(("neox/training/", "neox/checkpoint/")) and isinstance(node, ast.Compare)
                and any(isinstance(n, ast.Attribute) and n.attr == "pipe_parallel_size"
                        for n in (node.left, *node.comparators))):
            out.append(f"{where}: pipeline-or-not decided outside {BOUNDARY}")
    return out


def test_only_the_boundary_knows_deepspeed():
    problems = [p for rel, tree in _sources() for p in _problems(rel, tree)]
    assert problems == []


def test_the_scan_sees_each_kind_of_touch():
    """The rules catch what the boundary replaced (the old code's patterns, parsed here)."""
    old = '''
import deepspeed
from deepspeed.runtime.pipe.engine import PipelineEngine
config = engine._config
engine.enable_backward_allreduce = False
object.__setattr__(engine, "_neox_s3_uploader", up)
steps = getattr(engine, "global_steps", 0)
path = "/dev/shm/deepspeed_allreduce_buffer_1"
if args.parallel.pipe_parallel_size >= 1:
    pass
'''
    found = _problems("neox/training/loop.py", ast.parse(old))
    assert [p.split(": ", 1)[0] for p in found] == [f"neox/training/loop.py:{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9)]


@pytest.fixture(scope="module")
def _one_rank():
    from tests.unit.test_checkpoint import init_single_rank

    init_single_rank()


def _toy(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4,
           "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    return model, torch.optim.AdamW(model.parameters(), lr=0.1), cfg


def _train(engine, batches) -> list[torch.Tensor]:
    for x in batches:
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    return [p.detach().clone() for p in engine.module.parameters()]


def test_engine_steps_as_deepspeed_does(_one_rank):
    import deepspeed

    from neox.training.engine import initialize

    batches = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ours = initialize(*_toy(0)[:2], _toy(0)[2])
    ref, _, _, _ = deepspeed.initialize(model=(m := _toy(0))[0], optimizer=m[1], config=m[2])
    assert not ours.is_pipeline
    assert all(torch.equal(a, b) for a, b in zip(_train(ours, batches), _train(ref, batches)))
    assert (ours.global_steps, ours.train_batch_size(), ours.gradient_accumulation_steps()) == (ref.global_steps, 4, 2)
    assert ours.loss_scale() == 1.0 and ours.zero_optimization_stage() == 0 and ours.tensor_parallel_size == 1
    assert ours.layout(1) == {"world_size": 1, "data_parallel_size": 1, "model_parallel_size": 1,
                              "pipe_parallel_size": 1, "zero_stage": 0}


def test_save_reports_the_files_deepspeed_wrote(_one_rank, tmp_path):
    from neox.training.engine import initialize

    engine = initialize(*_toy(0)[:2], _toy(0)[2])
    written = engine.save_checkpoint(str(tmp_path), "global_step0", {"x": 1})
    on_disk = sorted(str(p) for p in (tmp_path / "global_step0").iterdir())
    assert sorted(written) == on_disk and not (tmp_path / "latest").exists()
    _, client = engine.load_checkpoint(str(tmp_path), "global_step0")
    assert client["x"] == 1


def test_pipeline_decided_from_the_config():
    from neox.config.parallel import ParallelConfig
    from neox.training.engine import uses_pipeline

    assert [uses_pipeline(ParallelConfig(pipe_parallel_size=n)) for n in (0, 1, 2)] == [False, True, True]


def test_pipeline_step_hook_sees_the_accumulated_gradients_before_clipping(_one_rank):
    """Engine.before_pipeline_step runs inside train_batch right before the optimizer step: the hook sees the
    micro-batches' mean gradient (reference: plain autograd on a copy of the model), not yet clipped, and
    the update still follows; None removes the hook; a plain engine refuses it."""
    from deepspeed.pipe import PipelineModule

    from neox.training.engine import initialize

    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)]
    ref = torch.nn.Sequential(*[torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)])
    ref.load_state_dict(torch.nn.Sequential(*layers).state_dict())
    model = PipelineModule(layers=layers, num_stages=1, loss_fn=lambda out, y: (out - y).pow(2).mean())
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4,
           "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "gradient_clipping": 1e-3}
    engine = initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(2, 4, generator=g), torch.randn(2, 1, generator=g)) for _ in range(2)]
    for x, y in batches:
        ((ref(x) - y).pow(2).mean() / 2).backward()
    seen: list[list[torch.Tensor]] = []
    engine.before_pipeline_step(lambda: seen.append([p.grad.clone() for p in model.parameters()]))
    before = [p.detach().clone() for p in model.parameters()]
    engine.train_batch(iter(batches))
    assert len(seen) == 1
    for got, want in zip(seen[0], ref.parameters()):
        torch.testing.assert_close(got, want.grad, rtol=1e-5, atol=1e-7)
    assert torch.linalg.vector_norm(torch.cat([t.flatten() for t in seen[0]])) > 1e-2  # unclipped (clip: 1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step still ran
    engine.before_pipeline_step(None)
    engine.train_batch(iter(batches))
    assert len(seen) == 1
    with pytest.raises(ValueError, match="plain engine"):
        initialize(*_toy(0)[:2], _toy(0)[2]).before_pipeline_step(lambda: None)
