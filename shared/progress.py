"""How a long library call shows that it is working.

- Stage lines ("ica: 18 networks covering ..."): INFO records of the loggers under `PROGRESS`.
  Called from Python, the library prints nothing: the records go wherever the caller's logging
  sends INFO (`logging.basicConfig(level=logging.INFO)` shows them). The commands print them on
  stdout, one plain line each (`shared.cli.progress_on_stdout`).
- Progress bars on stderr for the steps that take more than a few seconds: one switch for every
  bar of the packages, off in a library call (nothing printed), on in the commands unless `--quiet`;
  a notebook may call `show_progress(True)`. On a terminal (or in a notebook) a bar redraws itself;
  into a file or a pipe it is a plain line (`LogLines`): its state at most every
  LOG_LINE_SECONDS and when it ends, never a carriage-return redraw (a log keeps lines, not
  thousands of redraws on one line).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm
from tqdm.std import tqdm as std_tqdm

PROGRESS = "fn.progress"
LOG_LINE_SECONDS = 10.0  # into a file or a pipe: a bar's state at most this often
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


class LogLines(std_tqdm):
    """A tqdm bar for a stream that is not a terminal: each state it shows is one plain line (ASCII),
    at most every LOG_LINE_SECONDS (none at its start) and its last state when it closes, whether or
    not it is to be left on screen; nothing is cleared or redrawn."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._last_line = time.monotonic()
        kwargs.update(ascii=True, dynamic_ncols=False)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is None and time.monotonic() - self._last_line >= LOG_LINE_SECONDS:
            self._line()
        return False  # a clearing message (msg="") has nothing to take back

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear: the lines stay (tqdm clears bars around a `tqdm.write`)."""

    def close(self) -> None:
        if not self.disable:
            self._line()
        self.leave = False  # the last line is written: tqdm's close adds nothing
        super().close()

    def _line(self) -> None:
        self._last_line = time.monotonic()
        self.fp.write(f"{self}\n")
        self.fp.flush()


def _on_terminal() -> bool:
    """Whether a bar may redraw itself: stderr is a terminal, or this is a notebook (tqdm.auto's widget)."""
    in_notebook = any(klass.__module__ == "tqdm.notebook" for klass in tqdm.__mro__)
    return in_notebook or bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(*, disable: bool = False, **kwargs: Any) -> std_tqdm:
    """A tqdm bar on stderr (kwargs as tqdm's), hidden when progress is switched off or `disable`;
    plain lines when stderr is a file or a pipe (`LogLines`)."""
    bar = tqdm if _on_terminal() else LogLines
    return bar(file=sys.stderr, disable=disable or not _shown, **kwargs)


def close_open_bars() -> None:
    """End every bar still open (a library's, left by a step that failed mid-way, as the Trainer's is),
    so that the line printed next stands on a line of its own, not after the bar's last state."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
