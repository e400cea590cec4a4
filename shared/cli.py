"""What the command-line layers share: logging set-up and the one handler of every failure."""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import typer

from shared.errors import Interrupted, UserError
from shared.jsonio import write_text_atomic

P = ParamSpec("P")
R = TypeVar("R")


# Libraries whose logs are hidden unless --verbose. They log warnings about optional
# kernels and log errors just before raising them; a failure reaches the user as our one
# error line, naming the cause, so a failed run prints that line and nothing else.
QUIET_LIBRARIES = ("accelerate", "bitsandbytes", "datasets", "huggingface_hub", "peft", "transformers", "trl")


# Whether this process's command runs with --verbose: set by setup_logging, which every command
# calls first; read by handle_errors to print a traceback.
_verbose = False


def setup_logging(verbose: bool = False) -> None:
    """Our logs at INFO with --verbose, else WARNING; the libraries' logs and progress bars
    (datasets' "Generating train split", transformers' "Loading weights") only with --verbose."""
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import datasets.utils.logging
    import transformers.utils.logging

    level = logging.WARNING if verbose else logging.CRITICAL
    for library in (datasets.utils.logging, transformers.utils.logging):
        library.set_verbosity(level)  # configures the library's own handler first
        if verbose:
            library.enable_progress_bar()
        else:
            library.disable_progress_bar()
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(level)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _write_traceback(exc: BaseException, command: str) -> str:
    """The full traceback in a log file of the system temp folder (the output folder may be
    gone, or be the full disk); its path, or why it could not be written."""
    path = Path(tempfile.gettempdir()) / f"fn-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        write_text_atomic(path, f"{command}\n" + "".join(traceback.format_exception(exc)))
    except OSError as write_error:
        return f"the traceback could not be written to {path} ({write_error.strerror or write_error})"
    return f"full traceback in {path}"


def handle_errors(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """The top-level handler of the command `name`: nothing reaches the user as a raw traceback.

    A UserError is one line on stderr and exit code 2; an Interrupted run one line and
    128 + the signal's number; any other exception one line naming the command, the
    exception and where it was raised, with the path of a log file holding the traceback,
    and exit code 1 (after `--verbose` set up logging, the traceback is printed too)."""

    def decorate(command: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(command)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return command(*args, **kwargs)
            except UserError as exc:
                typer.echo(f"error: {_one_line(str(exc))}", err=True)
                raise typer.Exit(code=2) from None
            except Interrupted as exc:
                typer.echo(f"stopped by {exc.signal_name}: {_one_line(str(exc))}", err=True)
                raise typer.Exit(code=128 + exc.signal_number) from None
            except (typer.Exit, typer.Abort):
                raise
            except Exception as exc:
                if _verbose:
                    traceback.print_exception(exc, file=sys.stderr)
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                what = _one_line(f"{type(exc).__name__}: {exc}")
                typer.echo(
                    f"error: {name} failed: {what} (in {Path(frame.filename).name}:{frame.lineno}); "
                    f"{_write_traceback(exc, ' '.join(sys.argv))}; pass --verbose to print it",
                    err=True,
                )
                raise typer.Exit(code=1) from None

        return wrapper

    return decorate
