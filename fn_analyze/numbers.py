"""Lists of numbers given as text, as the configs read them. Imports nothing heavy (the configs use it)."""

from __future__ import annotations

from collections.abc import Sequence

from shared.errors import ParameterError


def parse_int_list(value: str | Sequence[int] | None, parameter: str) -> list[int]:
    """`"0,1"` (or a sequence of integers) -> [0, 1]; None or "" -> []; refused unless non-negative integers
    (the error names `parameter`)."""
    if value is None:
        return []
    items = [item.strip() for item in value.split(",")] if isinstance(value, str) else list(value)
    items = [item for item in items if item != ""]
    try:
        numbers = [int(item) for item in items]
    except (TypeError, ValueError):
        raise ParameterError(
            "{" + parameter + "} must be a comma-separated list of integers, got {value!r}", value=value
        ) from None
    negative = [n for n in numbers if n < 0]
    if negative:
        raise ParameterError("{" + parameter + "} takes non-negative integers, got {got}", got=negative[0])
    return sorted(set(numbers))
