"""Lists of numbers as every flag and config key writes them: `0,2-5,8` -> [0, 2, 3, 4, 5, 8].

Items are non-negative integers or ranges `a-b` with both ends included, separated by commas.
The old `a:b` form (end excluded, as a Python slice) is refused with its new spelling rather
than read, so that no list silently changes meaning.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from shared.errors import ParameterError

_NUMBER = re.compile(r"\d+")
_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)")
_OLD_RANGE = re.compile(r"(\d+)\s*:\s*(\d+)")


def parse_numbers(value: str | int | Sequence[int] | None, parameter: str, names: tuple[str, ...] = ()) -> list[int]:
    """`"0,2-5,8"` (or an integer, or a sequence of integers) -> [0, 2, 3, 4, 5, 8], sorted and each
    once; None or "" -> []. Items equal to one of `names` (any case) are allowed and left to the
    caller. Empty items, reversed ranges, negative numbers and `a:b` ranges are refused in one
    line (a `ParameterError` naming `parameter`)."""
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, str):
        integers = isinstance(value, (list, tuple)) and all(
            isinstance(n, int) and not isinstance(n, bool) for n in value
        )
        if not integers:
            raise ParameterError("{" + parameter + "} must be integers such as 0,2-5,8, got {value!r}", value=value)
        negative = [n for n in value if n < 0]
        if negative:
            raise ParameterError("{" + parameter + "} takes non-negative integers, got {got}", got=negative[0])
        return sorted(set(value))
    if not value.strip():
        return []
    numbers: set[int] = set()
    for item in (part.strip() for part in value.split(",")):
        if item.lower() not in names:
            numbers.update(_parse_item(item, value, parameter, names))
    return sorted(numbers)


def _parse_item(item: str, value: str, parameter: str, names: tuple[str, ...]) -> range:
    name = "{" + parameter + "}"
    example = " or ".join(["numbers such as 0,2-5,8", *names])
    if _NUMBER.fullmatch(item):
        return range(int(item), int(item) + 1)
    if match := _RANGE.fullmatch(item):
        start, end = int(match[1]), int(match[2])
        if end < start:
            raise ParameterError(
                name + " {value!r}: range {item} is reversed; write {fix} (end included)",
                value=value, item=item, fix=f"{end}-{start}",
            )  # fmt: skip
        return range(start, end + 1)
    if ":" in item:
        match = _OLD_RANGE.fullmatch(item)
        if match and int(match[2]) > int(match[1]):
            start, end = int(match[1]), int(match[2]) - 1
            fix = f"{start}-{end}" if end > start else str(start)
        else:
            fix = "a-b, e.g. 2-4"
        raise ParameterError(
            name + " {item} uses the old a:b range (end excluded); write {fix} (end included)", item=item, fix=fix
        )
    if not item:
        raise ParameterError(name + " {value!r} has an empty item; write {example}", value=value, example=example)
    if item.startswith("-"):
        raise ParameterError(name + " {value!r}: {item} is negative; numbers start at 0", value=value, item=item)
    raise ParameterError(
        name + " {value!r}: {item!r} is not a number or range; write {example}", value=value, item=item, example=example
    )
