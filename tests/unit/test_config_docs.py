"""docs/config.md is exactly what tools/gen_config_docs.py generates from the dataclasses."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "tools" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_docs_match_the_generator():
    gen = load_generator()
    assert (ROOT / "docs" / "config.md").read_text() == gen.render(), "run: python tools/gen_config_docs.py"


def test_every_field_is_documented():
    gen = load_generator()
    text = gen.render()
    for cls in gen.SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text
    assert "| `bias_gelu_fusion` |" in text and "| `moe_num_experts` |" in text
