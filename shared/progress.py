"""Progress bars on stderr for the steps that take more than a few seconds, off with `--quiet`.

One switch for every bar of the packages: the command line sets it from `--quiet`; a notebook
may call `show_progress(False)`.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

_shown = True


def show_progress(shown: bool) -> None:
    global _shown
    _shown = shown


def progress_bar(*, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (kwargs as tqdm's), hidden when progress is switched off or `disable`."""
    return tqdm(file=sys.stderr, disable=disable or not _shown, **kwargs)
