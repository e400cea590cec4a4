"""Checks on what the commands print and draw."""

from __future__ import annotations

import re
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def assert_every_printed_figure_is_stored(results: dict, table: str) -> None:
    """Every number an evaluate table prints is a figure of its results JSON (rounded as printed,
    or as a percentage); strings of the results (names, paths, sources) may hold digits and are
    not figures."""

    def leaves(value) -> list:
        if isinstance(value, dict):
            return [leaf for v in value.values() for leaf in leaves(v)]
        if isinstance(value, list):
            return [leaf for v in value for leaf in leaves(v)]
        return [value]

    stored = [float(v) for v in leaves(results) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for text in sorted((v for v in leaves(results) if isinstance(v, str) and v), key=len, reverse=True):
        table = table.replace(text, " ")
    printed = re.findall(r"(?<![\w.-])-?\d+(?:\.\d+)?", table)
    assert len(printed) > 40
    for text in printed:
        decimals = len(text.split(".")[1]) if "." in text else 0
        value = float(text)
        matched = any(round(f, decimals) == value or round(100 * f, decimals) == value for f in stored)
        assert matched, f"{text} is printed but is not a figure of the results JSON"
