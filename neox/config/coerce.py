"""Checks and converts one YAML value to its field's declared type, with one-line messages."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from neox.config.derive import key_error


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(hint, "__name__", str(hint))


def _coerce_scalar(value: Any, hint: Any) -> Any:
    """Converted value, or raise ValueError."""
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if hint is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError
    if hint is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise ValueError
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    raise ValueError


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint`` (a field annotation); ConfigError naming ``key`` if it does not fit."""
    try:
        return _coerce(value, hint)
    except ValueError:
        raise key_error(key, f"expected {_type_name(hint)}, got {value!r}") from None


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except ValueError:
                continue
        raise ValueError
    if origin is Literal:
        if value in typing.get_args(hint) and not isinstance(value, bool):
            return value
        raise ValueError
    if origin in (list, dict) and value is None:
        return origin()
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if isinstance(value, str) and item is str:
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return [_coerce(v, item) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError
        return dict(value)
    if value is None:
        raise ValueError
    return _coerce_scalar(value, hint)
