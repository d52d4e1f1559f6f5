"""Every typed config field does something: it is read outside neox/config (the model, training,
checkpoint, logging, data, tokenizer, megatron_core, the entry points and tools), or by the config
code whose output others consume (derivation inputs, the DeepSpeed config, the FP8 plan), or it is
listed in ``compat.NO_EFFECT_FIELDS`` with the reason it changes nothing. A new field that nothing
reads fails here."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from neox.config import NeoXArgs
from neox.config.compat import NO_EFFECT_FIELDS

ROOT = Path(__file__).resolve().parents[2]
# Config modules whose output is consumed elsewhere, and the parts of them that consume fields
# (None: the whole module). validate.py, args.py, keys.py and coerce.py only check or move values.
CONFIG_CONSUMERS: dict[str, tuple[str, ...] | None] = {
    "neox/config/derive.py": None,  # inputs of derived fields (each derived field is checked in turn)
    "neox/config/deepspeed.py": None,  # the DeepSpeed config handed to deepspeed.initialize
    "neox/config/compat.py": ("fp8_plan", "_TE_LAYERS", "_TE_SCALING"),  # the FP8 plan model/fp8.py applies
}


def typed_fields(root: type = NeoXArgs) -> dict[str, str]:
    """{field: section} over every section of NeoXArgs."""
    args, out = root(), {}
    for section in dataclasses.fields(root):
        value = getattr(args, section.name)
        if dataclasses.is_dataclass(value):
            out.update({f.name: section.name for f in dataclasses.fields(value)})
    return out


def _names_in(nodes: list[ast.AST]) -> tuple[set[str], list[re.Pattern]]:
    """Attribute names and string constants read in ``nodes``; f-strings as patterns
    (``getattr(d, f"{split}_data_paths")``)."""
    names, patterns = set(), []
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
            elif isinstance(node, ast.JoinedStr):
                fixed = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if re.fullmatch(r"_?[a-z]+(_[a-z]+)+_?", fixed):  # a field-name part like "_data_paths"
                    parts = [re.escape(v.value) if isinstance(v, ast.Constant) else r"[a-z]+" for v in node.values]
                    patterns.append(re.compile("".join(parts)))
    return names, patterns


def _module_nodes(path: Path, only: tuple[str, ...] | None) -> list[ast.AST]:
    tree = ast.parse(path.read_text())
    if only is None:
        return [tree]
    picked = []
    for node in tree.body:
        targets = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        if set(targets) & set(only):
            picked.append(node)
    return picked


def consumer_files() -> list[Path]:
    files = [p for p in (ROOT / "neox").rglob("*.py") if p.parent.name != "config" or p.parent.parent.name != "neox"]
    files += list((ROOT / "megatron_core").rglob("*.py")) + list(ROOT.glob("*.py")) + list((ROOT / "tools").glob("*.py"))
    return files


def read_names() -> tuple[set[str], list[re.Pattern]]:
    nodes = [ast.parse(p.read_text()) for p in consumer_files()]
    nodes += [n for rel, only in CONFIG_CONSUMERS.items() for n in _module_nodes(ROOT / rel, only)]
    return _names_in(nodes)


def unlisted_unread(fields: dict[str, str]) -> list[str]:
    names, patterns = read_names()
    unread = sorted(f for f in fields if f not in names and not any(p.fullmatch(f) for p in patterns))
    return [f"{fields[f]}.{f}" for f in unread if f not in NO_EFFECT_FIELDS]


def test_every_typed_field_is_consumed_or_listed_as_no_effect():
    unlisted = unlisted_unread(typed_fields())
    assert not unlisted, f"typed fields nothing reads (honour them, or list them in compat.NO_EFFECT_FIELDS): {unlisted}"


def test_no_effect_list_is_honest():
    files = consumer_files() + [ROOT / rel for rel in CONFIG_CONSUMERS]
    attributes = {n.attr for p in files for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Attribute)}
    fields = typed_fields()
    for f, reason in NO_EFFECT_FIELDS.items():
        assert f in fields, f"{f}: listed as a no-effect field but not a typed field"
        assert len(reason) > 20, f"{f}: give the reason"
        assert f not in attributes, f"{f}: listed as no-effect but read somewhere; remove it from NO_EFFECT_FIELDS"


def test_the_check_fails_for_a_new_field_nothing_reads():
    from neox.config.run import LoggingConfig

    @dataclasses.dataclass(frozen=True)
    class Extended(LoggingConfig):
        zz_never_read: bool = False

    root = dataclasses.make_dataclass("Root", [("logging", Extended, dataclasses.field(default_factory=Extended))])
    assert unlisted_unread(typed_fields(root)) == ["logging.zz_never_read"]


def test_the_seam4_fields_are_consumed_outside_config():
    names, _ = _names_in([ast.parse(p.read_text()) for p in consumer_files()])
    honoured = ["pipe_partition_method", "override_lr_scheduler", "use_checkpoint_lr_scheduler", "wandb_init_all_ranks",
                "log_grad_norm", "log_param_norm", "deepspeed_mpi", "sliding_window_width"]
    assert [f for f in honoured if f not in names] == []
