"""What a path given on the command line is, told from the marker files this project (and the
libraries it saves with) write, so a folder argument of the wrong kind is refused in one line
before anything heavy loads."""

from __future__ import annotations

from pathlib import Path

from shared.constants import (
    ADAPTER_CONFIG_NAME,
    MANIFEST_NAME,
    MODEL_CONFIG_NAME,
    PRUNE_RECORD_NAME,
    RUN_CONFIG_NAME,
    TRAINER_STATE_NAME,
)
from shared.errors import UserError

# The first marker found names the kind: a pruned model and a checkpoint also hold a model's
# config.json, and a run saved as a LoRA adapter also holds the adapter's config.
_MARKERS: list[tuple[str, str]] = [
    (MANIFEST_NAME, "activations"),
    (PRUNE_RECORD_NAME, "pruned model"),
    (TRAINER_STATE_NAME, "checkpoint"),
    (RUN_CONFIG_NAME, "fn-train run"),
    (ADAPTER_CONFIG_NAME, "lora adapter"),
    (MODEL_CONFIG_NAME, "model"),
]


def kind(path: Path) -> str:
    """One of "missing", "file", "empty folder", "activations", "pruned model", "checkpoint",
    "fn-train run", "lora adapter", "model" or "other folder"."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    for marker, name in _MARKERS:
        if (path / marker).is_file():
            return name
    return "empty folder" if not any(path.iterdir()) else "other folder"


_PHRASES = {
    "missing": "does not exist",
    "file": "is a file",
    "empty folder": "is an empty folder",
    "activations": "is an activations folder",
    "pruned model": "is a pruned model folder",
    "checkpoint": "is a training checkpoint",
    "fn-train run": "is an fn-train output folder",
    "lora adapter": "is a LoRA adapter folder",
    "model": "is a model folder",
    "other folder": "is a folder of no kind this project reads",
}


def describe(found: str) -> str:
    """`kind`'s answer as the phrase that follows the path: "does not exist", "is a model folder"."""
    return _PHRASES[found]


def expect(path: Path, flag: str, wanted: set[str], expected: str, fix: str) -> str:
    """`kind(path)` when it is one of `wanted`; else a one-line UserError saying what the path is,
    what `flag` expects (`expected`, a phrase) and what to give instead (`fix`)."""
    found = kind(path)
    if found not in wanted:
        raise UserError(f"{flag} {path} {describe(found)}, not {expected}; {fix}")
    return found
