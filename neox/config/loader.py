"""Reads GPT-NeoX YAML files and merges them left to right, remembering which file set each key.

NeoX files are YAML with JSON-style braces, ``#`` comments and trailing commas; PyYAML reads those.
Two things are added: ``1e-5``-style floats (YAML 1.1 would read a string) and duplicate detection.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from neox.config.keys import canonical
from neox.errors import ConfigError

_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _NeoXLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot, and rejects conflicting duplicate keys."""


_NeoXLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))


def _construct_mapping(loader: _NeoXLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        value = loader.construct_object(value_node, deep=True)
        if key in out and out[key] != value:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"{loader.name}: {key}: set twice in this file (line {line}) with different values")
        out[key] = value
    return out


_NeoXLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """One NeoX config file as a dict (keys as written)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror or err})") from err
    loader = _NeoXLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from err
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    return data


def resolve_paths(paths: list[str], conf_dir: str | None = None) -> list[Path]:
    """Config paths as given, or under ``conf_dir`` (deepy.py -d) when they are relative."""
    out = []
    for p in paths:
        path = Path(p)
        if conf_dir is not None and not path.is_absolute():
            path = Path(conf_dir) / path
        out.append(path)
    return out


def merge_files(paths: list[str | os.PathLike]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge config files left to right into (flat canonical key -> value, key -> file that set it).

    The same key in two files (or under two spellings) with different values is a ConfigError naming both.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for path in paths:
        for raw_key, value in read_yaml(path).items():
            key = canonical(raw_key)
            if key in merged and merged[key] != value:
                raise ConfigError(
                    f"{path}: {key}: set to {value!r} here but to {merged[key]!r} in {sources[key]}; "
                    "set each key in one file only"
                )
            merged[key] = value
            sources.setdefault(key, str(path))
    return merged, sources
