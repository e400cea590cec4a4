"""Paths read from files (a manifest's shard names) and paths a command will write."""

from __future__ import annotations

from pathlib import Path

from shared.errors import UserError


def file_in_folder(folder: Path, name: object, where: str) -> Path:
    """`folder / name` for a file name read from `where`, refusing one that could leave the
    folder (`../x.h5`, `/etc/x`, `sub/x`): the files a manifest names live beside it."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise UserError(
            f"{where} names the file {name!r}, which is not a plain file name inside {folder}; "
            "the file was edited or damaged: write it again with the command that made it"
        )
    return Path(folder) / name


def check_writable_file(path: Path, flag: str, overwrite: bool) -> None:
    """Refuse, before any work, to write the file `path` over a folder, under a parent that is
    a file, or over an existing file unless `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file path such as {path / 'masks.json'}")
    existing = next((parent for parent in path.parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it or choose another {flag}")
