"""Atomic file writes: a reader never sees half a file.

Every file the packages write goes through `atomic_file`, JSON and text through the two
wrappers below, arrays and figures through the handle it yields; files written in many
steps under a temporary name (HDF5 shards) are put in place with `replace_durably`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A binary handle on a temporary file beside `path`, put in place by `replace_durably` when
    the block ends. A crash, a full disk or an exception in the block leaves the previous file
    whole and no temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private; give it ordinary permissions
        with os.fdopen(fd, "wb") as handle:
            yield handle
        replace_durably(Path(tmp_name), path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def replace_durably(written: Path, path: Path) -> None:
    """Rename the finished file `written` over `path` (same folder) so that a crash leaves either
    the previous file or the whole new one: its content is fsynced before the rename, and the
    folder after it, so that the rename itself lasts."""
    _fsync(written, os.O_RDONLY)
    os.replace(written, path)
    _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """`payload` as indented JSON, written with `atomic_file`."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """`text` in UTF-8, written with `atomic_file`."""
    with atomic_file(path) as handle:
        handle.write(text.encode("utf-8"))
