"""Option groups given as plain dicts: built into their dataclass, or refused with the setting that is wrong."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def as_group(cls: type[T], value, name: str) -> T:
    """``value`` as a ``cls`` (an option dataclass): an instance is kept, a dict of its settings is built into one
    (nested groups too, e.g. ``{"service": {"timeout": 60}}``); an unknown setting is refused with the nearest valid
    one, and anything else with the types accepted.

    Args:
        cls: the option group's dataclass, e.g. ``RefineOptions``.
        value: an instance of it, or a dict of its settings.
        name: the group's name in errors, e.g. ``data.refine``.
    """
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a {cls.__name__} or a dict of its settings, got {type(value).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            nearest = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
            raise ValueError(f"{name} has no setting {key!r}{hint}: its settings are {', '.join(fields)}.")
    kwargs = {}
    for key, item in value.items():
        default = fields[key].default
        nested = dataclasses.is_dataclass(default) and not isinstance(default, type)
        kwargs[key] = as_group(type(default), item, f"{name}.{key}") if nested and isinstance(item, Mapping) else item
    return cls(**kwargs)
