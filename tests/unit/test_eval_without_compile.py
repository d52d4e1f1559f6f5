"""In-training eval_tasks set the training blocks' compile aside (neox.eval.training.without_compile).

The reference is Dynamo's own behaviour, shown first on the same compiled block: a batch of another shape
compiles a dynamic-shape graph, and training's shape then runs through that newest graph. Inside
``without_compile`` the eval batches compile nothing, give the eager outputs, and training's next step
runs its original graph.
"""

from __future__ import annotations

import torch

from neox.config import NeoXArgs
from neox.eval.training import without_compile
from neox.model import GPTModel
from neox.model.decode_graph import is_compiled
from tests.unit import eval_helpers as H


def _model_with_recording_compile() -> tuple[GPTModel, list[tuple[int, bool]]]:
    """A tiny GPTModel whose blocks are compiled in place, as training compiles them, by a backend that
    records each graph it is given (its id, whether its shapes are symbolic) and each graph that runs."""
    torch._dynamo.reset()  # Dynamo remembers dynamic dims per code object, across modules and tests
    torch.manual_seed(0)
    model = GPTModel(NeoXArgs.from_flat(H.model_flat(), world_size=1).model).eval()
    events: list[tuple[int, bool]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        gid = len({g for g, _ in events})
        dynamic = any(isinstance(s, torch.SymInt) for n in gm.graph.nodes
                      for s in getattr(n.meta.get("example_value"), "shape", ()))

        def run(*args: object) -> object:
            events.append((gid, dynamic))
            return gm(*args)
        return run

    for layer in model.layers:
        layer.compile(backend=backend)
    return model, events


def _ids(b: int, s: int) -> torch.Tensor:
    return torch.randint(0, 512, (b, s))


@torch.no_grad()
def test_dynamo_reference_other_shapes_move_training_to_a_dynamic_graph():
    model, events = _model_with_recording_compile()
    model(_ids(2, 32))  # training's shape
    first = events[-1]
    for s in (17, 23):  # evaluation batches
        model(_ids(2, s))
    events.clear()
    model(_ids(2, 32))
    assert not first[1] and events and all(dynamic for _, dynamic in events)


@torch.no_grad()
def test_eval_under_without_compile_compiles_nothing_and_training_keeps_its_graph():
    model, events = _model_with_recording_compile()
    model(_ids(2, 32))
    training_graphs = set(events)
    assert training_graphs and not any(dynamic for _, dynamic in training_graphs)

    eager = GPTModel(NeoXArgs.from_flat(H.model_flat(), world_size=1).model).eval()
    eager.load_state_dict(model.state_dict())
    events.clear()
    with without_compile(model):
        assert not any(is_compiled(m) for m in model.modules())
        for s in (17, 23):
            ids = _ids(3, s)
            torch.testing.assert_close(model(ids), eager(ids), rtol=0, atol=0)
    assert events == []  # nothing compiled or run compiled while evaluating
    assert all(is_compiled(layer) for layer in model.layers)
    model(_ids(2, 32))
    assert set(events) == training_graphs  # training's step runs its own static graph again


def test_without_compile_restores_on_error():
    model, _ = _model_with_recording_compile()
    try:
        with without_compile(model):
            raise RuntimeError("harness failed")
    except RuntimeError:
        pass
    assert all(is_compiled(layer) for layer in model.layers)


def test_in_training_eval_tasks_run_the_blocks_eagerly(tmp_path):
    """make_eval_tasks_fn's hook (what the training loop calls at eval_interval) on compiled blocks."""
    import types

    import pytest
    pytest.importorskip("lm_eval")
    from neox.eval.training import make_eval_tasks_fn
    from neox.tokenizer.build import build_tokenizer

    H.offline()
    args = NeoXArgs.from_flat(H.model_flat(eval_tasks=["arith_mc", "arith_gen"], eval_limit=4,
                                           eval_tasks_include_path=[H.task_dir(tmp_path)]), world_size=1)
    model, events = _model_with_recording_compile()
    model.train()
    model(_ids(2, 32))
    events.clear()
    run = make_eval_tasks_fn(args, types.SimpleNamespace(module=model), build_tokenizer(args.tokenizer),
                             types.SimpleNamespace(enabled=False))
    run(10)
    assert events == [] and model.training
    assert all(is_compiled(layer) for layer in model.layers)
