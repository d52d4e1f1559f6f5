"""NeoXArgs: the frozen root config, one attribute per section.

Flow: loader (files -> flat dict) -> from_flat (keys, types) -> derive -> validate -> frozen NeoXArgs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from neox.config import compat, derive, keys, validate
from neox.config.coerce import coerce
from neox.config.data import DataConfig, TokenizerConfig
from neox.config.loader import merge_files, resolve_paths
from neox.config.model import ModelConfig
from neox.config.optim import LRConfig, OptimizerConfig, PrecisionConfig
from neox.config.parallel import ParallelConfig
from neox.config.run import (
    CheckpointConfig,
    EvalConfig,
    LauncherConfig,
    LoggingConfig,
    TextGenConfig,
    TrainingConfig,
)
from neox.config.vocab import probe_vocab_size
from neox.errors import ConfigError

WorldPlanner = Callable[[Mapping[str, Any]], tuple[int, "str | None"]]
"""The launcher's answer to "how many ranks will this config get": (ranks, a note when it assumed)."""


@dataclass(frozen=True)
class NeoXArgs:
    """All arguments of one run; ``args.model.hidden_size`` is the flat NeoX key ``hidden_size``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    textgen: TextGenConfig = field(default_factory=TextGenConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compat: dict[str, Any] = field(default_factory=dict)
    """GPT-NeoX keys accepted for compatibility that have no effect here (see docs/config.md)."""

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_ymls(
        cls,
        paths: list[str] | str,
        overwrite_values: dict[str, Any] | None = None,
        *,
        conf_dir: str | None = None,
        world_size: int | None = None,
        plan_world: WorldPlanner | None = None,
    ) -> NeoXArgs:
        """Load NeoX YAML files (merged left to right), derive, validate and freeze.

        ``overwrite_values`` (flat keys) win over the files. The world size is ``world_size``, else what
        ``plan_world`` (the launcher's ``planned_world_size``, given the typed flat keys) answers, else
        num_gpus x num_nodes when num_gpus is set, else model_parallel_size x pipeline stages. Resolving
        itself looks at no GPU, hostfile or environment variable: the caller passes them in.
        """
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ConfigError("no config files given")
        values, sources = merge_files(resolve_paths([str(p) for p in paths], conf_dir))
        for key, value in (overwrite_values or {}).items():
            values[keys.canonical(key)] = value
            sources[keys.canonical(key)] = "overwrite_values"
        return cls.from_flat(values, sources=sources, world_size=world_size, plan_world=plan_world)

    @classmethod
    def from_flat(
        cls,
        values: dict[str, Any],
        *,
        sources: dict[str, str] | None = None,
        world_size: int | None = None,
        vocab_size: int | None = None,
        plan_world: WorldPlanner | None = None,
    ) -> NeoXArgs:
        """Build from flat NeoX keys (dashes and aliases allowed). Derived values already present are kept.
        ``world_size`` / ``plan_world`` as in ``from_ymls``."""
        args, notes = cls._resolve(values, sources or {}, world_size, vocab_size, plan_world)
        for note in notes:
            print(f"neox: warning: {note}", file=sys.stderr)
        return args

    @classmethod
    def _resolve(
        cls, values: dict[str, Any], sources: dict[str, str], world_size: int | None, vocab_size: int | None,
        plan_world: WorldPlanner | None,
    ) -> tuple[NeoXArgs, list[str]]:
        fallback = next(iter(sources.values()), "<config>")
        try:
            flat, extra = _split_and_coerce(values)
            notes: list[str] = []
            if world_size is None and plan_world is not None:
                world_size, note = plan_world(flat)
                notes += [note] if note else []
            elif world_size is None:
                world_size = default_world_size(flat)
            if flat["padded_vocab_size"] is None and vocab_size is None:
                vocab_size = probe_vocab_size(flat["tokenizer_type"], flat["vocab_file"])
            flat, derive_notes = derive.derive_all(flat, world_size, vocab_size)
            args = cls._build(flat, extra)
            validate.validate(args)
        except ConfigError as err:
            raise _with_file(err, sources, fallback) from err
        return args, notes + derive_notes

    @classmethod
    def _build(cls, flat: dict[str, Any], extra: dict[str, Any]) -> NeoXArgs:
        sections = {
            name: section_cls(**{f.name: flat[f.name] for f in dataclasses.fields(section_cls)})
            for name, section_cls in keys.SECTIONS.items()
        }
        return cls(**sections, compat=extra)

    # ---- views --------------------------------------------------------------------------------

    def to_flat(self) -> dict[str, Any]:
        """Flat NeoX keys -> resolved values (JSON-able); ``from_flat(to_flat())`` gives the same args."""
        out: dict[str, Any] = {}
        for name in keys.SECTIONS:
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                out[f.name] = copy.deepcopy(getattr(section, f.name))
        out.update(copy.deepcopy(self.compat))
        return out

    def with_vocab_size(self, vocab_size: int) -> NeoXArgs:
        """A new args whose padded_vocab_size is derived from the tokenizer's vocabulary size."""
        m = self.model
        padded = derive.pad_vocab_size(vocab_size, m.make_vocab_size_divisible_by, self.parallel.model_parallel_size)
        return dataclasses.replace(self, model=dataclasses.replace(m, padded_vocab_size=padded))

    def deepspeed_config(self) -> dict[str, Any]:
        """The config dict for ``deepspeed.initialize(config=...)``."""
        from neox.config.deepspeed import build_deepspeed_config

        return build_deepspeed_config(self)


def default_world_size(flat: Mapping[str, Any]) -> int:
    """The world size without a launcher's plan: num_gpus on each of num_nodes nodes when num_gpus is
    set, else the smallest world the model fits (model_parallel_size x pipeline stages)."""
    num_gpus, num_nodes = flat.get("num_gpus"), flat.get("num_nodes") or -1
    if num_gpus and num_gpus > 0:
        return num_gpus * max(num_nodes, 1)
    model_ranks = int(flat.get("model_parallel_size") or 1) * max(int(flat.get("pipe_parallel_size") or 0), 1)
    return max(model_ranks, num_nodes)


def _field_hints() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for section_cls in keys.SECTIONS.values():
        hints.update(typing.get_type_hints(section_cls))
    return hints


def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section_cls in keys.SECTIONS.values():
        instance = section_cls()
        for f in dataclasses.fields(instance):
            out[f.name] = copy.deepcopy(getattr(instance, f.name))
    return out


def _split_and_coerce(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(every field -> typed value, defaults filled in; compat key -> value). Unknown keys raise."""
    owners = keys.field_sections()
    hints = _field_hints()
    flat = _defaults()
    extra: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for raw_key, value in values.items():
        key = keys.canonical(raw_key)
        if key in seen and seen[key] != raw_key:
            raise derive.key_error(key, f"set twice, as '{seen[key]}' and '{raw_key}'")
        seen[key] = raw_key
        if key in owners:
            if key == "attention_config":  # NeoX's nested pairs; derive expands and checks them
                flat[key] = [] if value is None else value
            else:
                flat[key] = coerce(key, value, hints[key])
        elif key in compat.UNSUPPORTED:
            default = compat.UNSUPPORTED[key]
            if not compat.is_default(value, default):
                hint = compat.UNSUPPORTED_HINTS.get(key)
                raise derive.key_error(
                    key, f"{value!r} is not supported by neox (this GPT-NeoX feature is accepted only at its default "
                    f"{default!r})" + (f"; {hint}" if hint else ""))
            extra[key] = value
        elif key in keys.compat_keys():
            extra[key] = value
        else:
            raise derive.key_error(raw_key, keys.unknown_key_message(raw_key))
    return flat, extra


def _with_file(err: ConfigError, sources: dict[str, str], fallback: str) -> ConfigError:
    """Prefix a key error with the file that set the key (or the first config file)."""
    err_keys = getattr(err, "keys", None)
    if not err_keys:
        return err
    path = next((sources[k] for k in err_keys if k in sources), fallback)
    new = ConfigError(f"{path}: {err}")
    new.keys = err_keys  # type: ignore[attr-defined]
    return new
