"""What the command-line layers share: logging set-up and the user-error exit."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from shared.errors import UserError

P = ParamSpec("P")
R = TypeVar("R")


# Libraries whose logs are hidden unless --verbose. They log warnings about optional
# kernels and log errors just before raising them; a failure reaches the user as our one
# error line, naming the cause, so a failed run prints that line and nothing else.
QUIET_LIBRARIES = ("accelerate", "bitsandbytes", "datasets", "huggingface_hub", "peft", "transformers", "trl")


def setup_logging(verbose: bool = False) -> None:
    """Our logs at INFO with --verbose, else WARNING; the libraries' logs and progress bars
    (datasets' "Generating train split", transformers' "Loading weights") only with --verbose."""
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


def user_errors_exit(command: Callable[P, R]) -> Callable[P, R]:
    """A UserError becomes one line on stderr and exit code 2, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            message = " ".join(str(exc).split())
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper
