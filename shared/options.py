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
    # With both spellings (fn-train), the spelling messages and docs write: fn-train's own options are
    # hyphenated (`--mask-file`), the seed tool's HF-style ones keep the underscore (`--learning_rate`).
    hyphenated: bool = False


def option(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    off: str | None = None,
    text: bool = False,
    argument: bool = False,
    hyphenated: bool = False,
    default_factory: Callable[[], Any] | Any = MISSING,
) -> Any:
    """A dataclass field (no default: a required option) that is also an option of the command line."""
    spec = OptionSpec(help=help, flag=flag, off=off, text=text, argument=argument, hyphenated=hyphenated)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: spec})


def option_spec(field: dataclasses.Field) -> OptionSpec | None:
    """The field's OptionSpec, or None for a field that is not on the command line."""
    return field.metadata.get(_KEY)


def flag_namer(*configs: type, both_spellings: bool = False) -> Callable[[str], str]:
    """How the command built from `configs` writes a parameter of a `shared.errors.ParameterError` as
    its flag (`ParameterError.as_flags`): a field as its flag (`n_components` -> `--n-components`;
    with both spellings the underscore one unless the field is `hyphenated`), a boolean's
    `name=False` as its off-switch (`use_peft=False` -> `--no_peft`), any other name likewise."""

    def spelled(name: str, hyphenated: bool) -> str:
        return "--" + (name if both_spellings and not hyphenated else name.replace("_", "-"))

    flags: dict[str, str] = {}
    for field in (field for config in configs for field in dataclasses.fields(config)):
        spec = option_spec(field)
        if spec is None or spec.argument:
            continue
        name = spec.flag or field.name
        flags[field.name] = spelled(name, spec.hyphenated)
        if field.type in (bool, "bool"):
            flags[f"{field.name}=False"] = spelled(spec.off or f"no_{name}", spec.hyphenated)
    return lambda parameter: flags.get(parameter) or spelled(parameter, False)
