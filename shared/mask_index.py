"""The index of a mask folder (`index.json`): which mask files are there, for which model.

Updated under an exclusive file lock and written atomically, so two `fn-analyze ica`
runs writing into the same folder at once leave an index holding both.
"""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path
from typing import Any

from shared.constants import MASK_INDEX_NAME, MASK_INDEX_SCHEMA_VERSION
from shared.errors import UserError
from shared.jsonio import write_json_atomic
from shared.masks import MaskFile, load_mask_file
from shared.paths import check_writable_file


def read_index(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MASK_INDEX_NAME
    if not path.is_file():
        return {"schema_version": MASK_INDEX_SCHEMA_VERSION, "masks": []}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"mask index {path} is not valid JSON ({exc}); delete it or pass --no-register") from exc
    if not isinstance(index, dict) or not isinstance(index.get("masks"), list):
        raise UserError(f"mask index {path} has no 'masks' list; delete it or pass --no-register")
    return index


def check_mask_out(path: Path, overwrite: bool, register: bool) -> None:
    """Before any work: `path` can take a mask file (not a folder; an existing file only with
    `overwrite`) and, with `register`, its folder's index can be read."""
    path = Path(path)
    if path.is_file() and not overwrite:
        try:
            load_mask_file(path)
        except UserError:
            raise UserError(
                f"--out {path} is an existing file that is not a mask file; choose another --out "
                "(--overwrite would replace it)"
            ) from None
    check_writable_file(path, "--out", overwrite)
    if register:
        read_index(path.parent)


def register_mask(path: Path, mask: MaskFile) -> None:
    """Add (or replace) the entry of the mask file `path` in the index of its folder."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    entry = {
        "file": path.name,
        "model": mask.model.name,
        "model_type": mask.model.model_type,
        "fingerprint": mask.model.fingerprint,
        "n_networks": len(mask.networks),
        "method": mask.source.get("method"),
        "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(folder / f".{MASK_INDEX_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = read_index(folder)
        index["masks"] = [m for m in index["masks"] if m.get("file") != path.name] + [entry]
        write_json_atomic(folder / MASK_INDEX_NAME, index)
