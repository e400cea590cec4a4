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


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # bitsandbytes warns on import about optional CPU kernels, even when nothing is quantized.
    logging.getLogger("bitsandbytes").setLevel(logging.INFO if verbose else logging.ERROR)


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
