"""NeoXArgs: the frozen root config, one attribute per section.

Flow: loader (files -> flat dict) -> from_flat (keys, types) -> derive -> validate -> frozen NeoXArgs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import typing
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
    ) -> NeoXArgs:
        """Load NeoX YAML files (merged left to right), derive, validate and freeze.

        ``overwrite_values`` (flat keys) win over the files. ``world_size`` defaults to what the
        launcher will start (num_gpus x nodes, a hostfile, or the GPUs of this machine).
        """
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ConfigError("no config files given")
        values, sources = merge_files(resolve_paths([str(p) for p in paths], conf_dir))
        for key, value in (overwrite_values or {}).items():
            values[keys.canonical(key)] = value
            sources[keys.canonical(key)] = "overwrite_values"
        return cls.from_flat(values, sources=sources, world_size=world_size)

    @classmethod
    def from_flat(
        cls,
        values: dict[str, Any],
        *,
        sources: dict[str, str] | None = None,
        world_size: int | None = None,
        vocab_size: int | None = None,
    ) -> NeoXArgs:
        """Build from flat NeoX keys (dashes and aliases allowed). Derived values already present are kept."""
        args, notes = cls._resolve(values, sources or {}, world_size, vocab_size)
        for note in notes:
            print(f"neox: warning: {note}", file=sys.stderr)
        return args

    @classmethod
    def _resolve(
        cls, values: dict[str, Any], sources: dict[str, str], world_size: int | None, vocab_size: int | None
    ) -> tuple[NeoXArgs, list[str]]:
        fallback = next(iter(sources.values()), "<config>")
        try:
            flat, extra = _split_and_coerce(values)
            notes: list[str] = []
            if world_size is None:
                from neox.launcher import planned_world_size

                world_size, note = planned_world_size(flat)
                notes += [note] if note else []
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

    @classmethod
    def from_launcher(cls, argv: list[str] | None = None) -> NeoXArgs:
        """What every rank calls: the resolved config the launcher passed (``--neox_args``), re-derived
        with this rank's WORLD_SIZE. Ranks never read YAML."""
        from neox.launcher import ARGS_FLAG, decode_config, slurm_env_to_torch

        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument(ARGS_FLAG, required=True)
        parser.add_argument("--local_rank", type=int, default=None)
        known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        flat = decode_config(getattr(known, ARGS_FLAG.lstrip("-")))
        if flat.get("deepspeed_slurm"):
            slurm_env_to_torch(os.environ, flat.get("master_port", 29500))
        if known.local_rank is not None:
            os.environ.setdefault("LOCAL_RANK", str(known.local_rank))
        world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else flat.get("world_size")
        return cls.from_flat(flat, sources={k: "<launcher>" for k in flat}, world_size=world)

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
