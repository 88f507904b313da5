"""A typed config section: a frozen dataclass that is also one block of the run config.

Every section of the run config (`model`, `data`, `optimizer`, `train`, …) is declared once,
as a dataclass whose fields are the section's keys with their types and defaults. The
command-line config (`ml_collections.ConfigDict`, locked, so a typo or a value of the wrong
type fails at start-up) is built from those defaults (`to_section`), and the code reads it
back through the same class (`from_section`), which checks it: an unknown key is an error
naming it, and each class validates its own values in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections
from ml_collections import config_dict

S = TypeVar("S", bound="Section")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_class(annotation: Any) -> type | None:
    """The Section subclass a field holds (also through `X | None`), else None."""
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def _placeholder_type(annotation: Any) -> type:
    """The type a `None` default stands for: `int | None` -> int, `tuple[...] | None` ->
    tuple; a field typed `Any` takes any value (str placeholders are the common case)."""
    for candidate in typing.get_args(annotation) or (annotation,):
        origin = typing.get_origin(candidate) or candidate
        if origin in (type(None), types.NoneType):
            continue
        if isinstance(origin, type):
            return origin
    return str


class Section:
    """Mixin for frozen dataclasses: `from_section(block, where)` and `to_section()`."""

    @classmethod
    def from_section(cls: type[S], section: Mapping | ml_collections.ConfigDict, where: str) -> S:
        """Build from a config block (a ConfigDict or nested plain dict). `where` names the
        block in messages, e.g. "config.train"."""
        values = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else section
        values = dict(values)
        hints = _hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
        for name, value in list(values.items()):
            nested = _section_class(hints[name])
            if nested is not None and isinstance(value, Mapping | ml_collections.ConfigDict):
                values[name] = nested.from_section(value, f"{where}.{name}")
            elif isinstance(value, list):
                values[name] = _as_tuple(value)
        return cls(**values)

    def to_section(self) -> ml_collections.ConfigDict:
        """The block of the command-line config: these values, `None` as a typed placeholder
        (overridable later, still type-checked)."""
        section = ml_collections.ConfigDict()
        hints = _hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Section):
                section[field.name] = value.to_section()
            elif value is None:
                section[field.name] = config_dict.placeholder(_placeholder_type(hints[field.name]))
            else:
                section[field.name] = value
        return section

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values (JSON), tuples as lists."""
        return _plain(dataclasses.asdict(self))

    def replace(self: S, **changes: Any) -> S:
        return dataclasses.replace(self, **changes)


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
