"""The type of a config value read from a file, checked against the type its field declares.

YAML and JSON give any type under any key, so a config file's values are checked against the
dataclass's annotations before its value checks run: `learning_rate: fast` is one line naming
the key, not a TypeError from deep inside a run. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

from shared.errors import UserError


def expected_type(value: Any, hint: Any) -> str | None:
    """None when `value` fits the annotation `hint`, else what it should be, in words ("a number").

    A file holds text, so a `Path` takes a string. A number takes an int or a float, never a bool
    (YAML's true is no number). A `list[X]` also takes one X or a string: the short forms the
    configs' value checks parse (`seeds: 3`, `arms: lora,key`).
    """
    if hint is Any:
        return None
    if hint is None or hint is type(None):
        return None if value is None else "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        wanted = [expected_type(value, arm) for arm in args]
        return None if None in wanted else " or ".join(dict.fromkeys(_describe(arm) for arm in args))
    if origin is list:
        (item,) = args or (Any,)
        if isinstance(value, list):
            return None if all(expected_type(v, item) is None for v in value) else _describe(hint)
        if isinstance(value, str) or expected_type(value, item) is None:
            return None
        return _describe(hint)
    if origin is dict:
        key, item = args or (Any, Any)
        fits = isinstance(value, dict) and all(
            expected_type(k, key) is None and expected_type(v, item) is None for k, v in value.items()
        )
        return None if fits else _describe(hint)
    fits = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, (str, Path)),
    }.get(hint, True)  # another type (an enum, a choice): its value check says what it takes
    return None if fits else _describe(hint)


def _describe(hint: Any) -> str:
    """An annotation in words: `list[str]` -> "a list of strings"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arm) for arm in args))
    if origin is list:
        item = args[0] if args else Any
        return "a list" if item is Any else f"a list of {_plural(item)}"
    if origin is dict:
        return "a mapping (name: value)"
    words = {
        type(None): "null",
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "a string",
        Path: "a path",
    }
    return words.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _plural(hint: Any) -> str:
    """A list's items in words: `int | None` -> "whole numbers or nulls"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_plural(arm) for arm in typing.get_args(hint))
    words = {int: "whole numbers", float: "numbers", str: "strings", Path: "paths", type(None): "nulls"}
    return words.get(hint, "values")


def type_error(key: str, value: Any, hint: Any, example: Any = None) -> UserError | None:
    """None when `value` fits `hint`, else the one line a user reads: the key, the value and the type,
    with `example` when it fits (`learning_rate must be a number such as 0.0002, got 'fast'`)."""
    expected = expected_type(value, hint)
    if expected is None:
        return None
    if example is not None and not isinstance(example, bool) and expected_type(example, hint) is None:
        expected += f" such as {example!r}"
    return UserError(f"{key} must be {expected}, got {value!r}")


def check_types(config: Any) -> None:
    """Refuse the first field of the dataclass instance `config` whose value its annotation does
    not allow, before the config's value checks read it (one UserError line, `type_error`)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        default = None if field.default is dataclasses.MISSING else field.default
        if (error := type_error(field.name, getattr(config, field.name), hints[field.name], default)) is not None:
            raise error


def read_yaml(text: str) -> Any:
    """`yaml.safe_load`, but with YAML 1.2's numbers: PyYAML follows YAML 1.1, where `2e-4` (no dot)
    is text, so the type check would refuse the way a learning rate is usually written."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", number, list("-+0123456789"))
    return yaml.load(text, Loader=Loader)  # a SafeLoader: no Python objects
