"""Building frozen dataclasses from TOML tables, with errors that name the key, value and expectation.

:mod:`lungnode.config` declares the sections; this module only converts and checks types: unknown
keys, missing required keys, wrong types (``int`` is not ``bool``; ``float`` accepts integers; lists
become tuples; nested tables become nested dataclasses; ``X | None`` accepts ``X``). Fields with
``metadata={"internal": True}`` cannot be set from the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range.

    Parameters
    ----------
    key:
        Dotted key, e.g. ``node.port``.
    value:
        The offending value as read (``None`` when missing).
    expected:
        What would have been accepted, in words.
    """

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"{key} = {value!r}: expected {expected}")


T = TypeVar("T")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "unset"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(args[0], value, key)
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ConfigError(key, value, _describe(tp))
        return tuple(_convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a table")
        return build_dataclass(typing.cast(type, tp), value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    raise ConfigError(key, value, _describe(tp))  # pragma: no cover - schema error


def build_dataclass(cls: type[T], table: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields or fields[name].metadata.get("internal"):
            known = sorted(n for n, f in fields.items() if not f.metadata.get("internal"))
            raise ConfigError(key, value, f"a known key (one of {', '.join(known)})")
        kwargs[name] = _convert(hints[name], value, key)
    for name, f in fields.items():
        if (name not in kwargs and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(key, None, f"{_describe(hints[name])} (required)")
    return cls(**kwargs)
