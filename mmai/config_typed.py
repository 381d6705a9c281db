"""Frozen dataclasses from parsed YAML: the type checks behind :mod:`mmai.config`.

:func:`build_section` checks a mapping against a dataclass's annotations (an unknown key, a wrong
type or a value outside a ``Literal`` is a :class:`~mmai.errors.ConfigError` naming the key path,
the file and the allowed values; lists become tuples), :func:`to_plain` turns a config back into
plain YAML-able data, :func:`key_paths` lists the dotted keys a user wrote. Nothing is evaluated.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from mmai.errors import ConfigError


def to_plain(value: Any) -> Any:
    """``value`` with dataclasses as dicts and tuples as lists (what ``yaml.safe_dump`` writes)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{source}: {key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} = {value!r} is not allowed; choose one of {list(args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build_section(tp, value, key, source)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} must have {len(args)} entries, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: accept numeric text
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {_type_name(tp)}")


def build_section(cls: type, data: Any, path: str, source: str) -> Any:
    """The dataclass ``cls`` from the mapping ``data`` at key ``path`` of ``source`` (None: its defaults)."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {path} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key '{path}.{key}'; allowed keys in '{path}': {allowed}")
        kwargs[key] = _coerce(value, hints[key], f"{path}.{key}", source)
    return cls(**kwargs)


def key_paths(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key path of a nested mapping (``{"train": {"epochs": 3}}`` -> train, train.epochs)."""
    out: list[str] = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out.extend(key_paths(value, path + "."))
    return out
