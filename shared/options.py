"""Config fields that are also command-line options.

A config dataclass is the one source of each option: its default and its help text live in
the field (`option(...)`), and `shared.cli.config_options` builds the typer command from the
fields. A field declared without `option` (a plain default) is not on the command line.
This module imports nothing heavy, so that a config module can use it and the command line
built from it stays quick to start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import MISSING
from typing import Any

_KEY = "option"  # the key of a field's metadata that holds its OptionSpec


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """How a config field appears on the command line."""

    help: str
    flag: str | None = None  # the flag's name when it is not the field's (`set_aside` for set_aside_top)
    off: str | None = None  # a boolean's off-switch (default `no_<flag>`)
    # Given as text that the config's __post_init__ parses (`0,3` for a list, `auto` or a number):
    # the option's type is str, and a field with a default_factory has no default on the command line.
    text: bool = False
    argument: bool = False  # positional, not a --flag


def option(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    off: str | None = None,
    text: bool = False,
    argument: bool = False,
    default_factory: Callable[[], Any] | Any = MISSING,
) -> Any:
    """A dataclass field (no default: a required option) that is also an option of the command line."""
    spec = OptionSpec(help=help, flag=flag, off=off, text=text, argument=argument)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: spec})


def option_spec(field: dataclasses.Field) -> OptionSpec | None:
    """The field's OptionSpec, or None for a field that is not on the command line."""
    return field.metadata.get(_KEY)
