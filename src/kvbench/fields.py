"""Raw values (YAML, `name:key=value`) checked against the fields of the dataclass they configure.

One check for every spec kind and every strategy: unknown keys are listed with the valid ones, and
each value must match its field's type annotation. Whole-number fields refuse strings, floats (even
4.0) and booleans; a float field takes an int. List fields refuse a scalar (YAML `workloads: code`
would otherwise be iterated character by character) and become tuples.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from kvbench.errors import KvbenchError


def checked_fields(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """`data` checked against the fields of dataclass `cls`; `what` names the keys in messages
    ("suite key", "strategy 'h2o' parameter"). Lists become tuples; other values are returned as given."""
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - valid
    if unknown:
        raise KvbenchError(f"unknown {what}(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid)) or 'none'}")
    hints = typing.get_type_hints(cls)
    return {key: _checked(value, hints[key], f"{what} {key}") for key, value in data.items()}


def _checked(value: Any, hint: Any, name: str) -> Any:
    if typing.get_origin(hint) is tuple:
        key = name.rsplit(" ", 1)[-1]
        if not isinstance(value, (list, tuple)):
            raise KvbenchError(f"{name} must be a list, got {value!r}; write {key}: {json.dumps([value])}")
        element = typing.get_args(hint)[0]
        bad = [v for v in value if not _matches(v, element)]
        if bad:
            raise KvbenchError(f"{name} holds {bad[0]!r}; each item must be {_describe(element)}")
        return tuple(value)
    if not _matches(value, hint):
        raise KvbenchError(f"{name} must be {_describe(hint)}, got {value!r}")
    return value


def _matches(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if typing.get_origin(hint) is not None:  # dict[str, float] and the like: checked where they are used
        hint = typing.get_origin(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        return " or ".join(_describe(a) for a in arms if not (a is int and float in arms))
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", type(None): "null",
             dict: "a mapping"}
    if hint in names:
        return names[hint]
    return "a mapping" if dataclasses.is_dataclass(hint) else f"a {getattr(hint, '__name__', hint)}"
