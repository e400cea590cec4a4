"""How a long library call shows that it is working.

- Stage lines ("ica: 18 networks covering ..."): INFO records of the loggers under `PROGRESS`.
  Called from Python, the library prints nothing: the records go wherever the caller's logging
  sends INFO (`logging.basicConfig(level=logging.INFO)` shows them). The commands print them on
  stdout, one plain line each (`shared.cli.progress_on_stdout`).
- Progress bars on stderr for the steps that take more than a few seconds: one switch for every
  bar of the packages, off in a library call (nothing printed), on in the commands unless `--quiet`;
  a notebook may call `show_progress(True)`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

PROGRESS = "fn.progress"
_shown = False


def progress_log(stage: str) -> logging.Logger:
    """The logger of one stage's progress lines (`fn.progress.<stage>`)."""
    return logging.getLogger(f"{PROGRESS}.{stage}")


def show_progress(shown: bool) -> None:
    global _shown
    _shown = shown


@contextmanager
def progress_shown_while(shown: bool) -> Iterator[None]:
    """Bars on (or off) for the block, as they were after it: a command's setting ends with it."""
    before = _shown
    show_progress(shown)
    try:
        yield
    finally:
        show_progress(before)


def progress_shown() -> bool:
    """Whether bars are on (for libraries with their own, e.g. the HF Trainer's `disable_tqdm`)."""
    return _shown


def progress_bar(*, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (kwargs as tqdm's), hidden when progress is switched off or `disable`."""
    return tqdm(file=sys.stderr, disable=disable or not _shown, **kwargs)


def close_open_bars() -> None:
    """End every bar still open (a library's, left by a step that failed mid-way, as the Trainer's is),
    so that the line printed next stands on a line of its own, not after the bar's last state."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
