"""One strict way to build frozen config dataclasses from parsed YAML/JSON: the job spec, the settings."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from concepts.errors import InvalidArgument

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """`cls(**data)`, naming by path (`where.key`) any unknown key, missing required key or rejected value.

    A field whose default factory is itself a dataclass is built from its dict the same way, so nested
    sections (`hyperparameters`, `kubernetes`) are checked key by key too.

    Raises:
        InvalidArgument: `data` is not a mapping, has an unknown key, lacks a required one, or a
            `__post_init__` rejects a value; the field is the dotted path from `where`.
    """
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise InvalidArgument(where or "config", f"must be an object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidArgument(prefix + unknown[0], f"unknown key(s) {unknown}; known keys: {sorted(known)}")
    missing = [n for n, f in known.items() if n not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InvalidArgument(prefix + missing[0], "is required")
    kwargs = {}
    for key, value in data.items():
        factory = known[key].default_factory
        if isinstance(value, dict) and factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            value = from_dict(factory, value, prefix + key)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except InvalidArgument as e:
        if not where or e.field.startswith(prefix):
            raise
        raise InvalidArgument(prefix + e.field, e.description) from None
