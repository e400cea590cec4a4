"""The exception types a user is meant to read, and the one failure we recognise by its cause."""

from __future__ import annotations

import errno
import signal
import string
import threading
from collections.abc import Callable


class UserError(Exception):
    """Bad input or a state the user can fix.

    The CLIs print the message as a single line and exit with code 2, without a
    traceback. The message names the problem and the fix.
    """


class Interrupted(Exception):
    """A run stopped on request (SIGTERM from a scheduler, Ctrl-C) after leaving resumable work.

    The CLIs print the message as a single line and exit with 128 + the signal's number
    (143 for SIGTERM, 130 for SIGINT), as a process killed by it would.
    """

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name


# How the libraries that write our files report a full disk when they drop the errno:
# HDF5's error stack ("errno = 28") and the C library's message.
_DISK_FULL_TEXT = ("No space left on device", "errno = 28")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is a full disk (ENOSPC)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if any(text in str(seen) for text in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_unsafe_shutdown = threading.Event()


def skip_library_shutdown() -> None:
    """Say that a library holds a file it could not close (HDF5 after a write failed for want of
    room), which its own shutdown at exit would crash on: the command line then ends the process
    at once after its message (`os._exit`, with the same exit code)."""
    _unsafe_shutdown.set()


def library_shutdown_is_unsafe() -> bool:
    return _unsafe_shutdown.is_set()


class ParameterError(UserError, ValueError):
    """A bad value of a named parameter, worded for whoever passed it.

    The message is a `str.format` template whose fields are parameter names (`{n_components}`)
    or the values given as keywords. From Python a parameter reads as its name
    (`n_components must be at least 1, got 0`); a command reads it as its flag
    (`--n-components ...`, `as_flags`), so the same check serves the API and the command line.
    """

    def __init__(self, template: str, **values: object) -> None:
        self.template = template
        self.values = values
        self.parameters = tuple(
            name for _, name, _, _ in string.Formatter().parse(template) if name and name not in values
        )
        super().__init__(self.render(lambda name: name))

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with each parameter written as `name_of(parameter)`."""
        return self.template.format(**{name: name_of(name) for name in self.parameters}, **self.values)

    def as_flags(self, flag_of: Callable[[str], str] | None = None) -> str:
        """The message with each parameter written as its command-line flag (default `--name-hyphenated`)."""
        return self.render(flag_of or (lambda name: "--" + name.replace("_", "-")))
