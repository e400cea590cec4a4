"""fn-train's output folder: refuse one that is not ours, leave nothing half-made behind.

A folder is fn-train's when it holds `fn_train_config.json`, which a run writes into it
before anything else. One that holds an earlier run's output is refused unless the run
replaces it (--overwrite_output_dir: all of it goes first) or resumes it. A run that fails
before its first checkpoint removes the folder it created; the final save is written to a
staging folder inside it and moved into place file by file, replacing the previous final files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.constants import CHECKPOINT_PREFIX, ICA_MASK_NAME, RUN_CONFIG_NAME, STAGING_NAME
from shared.errors import UserError

KEPT_ACROSS_SAVES = {RUN_CONFIG_NAME, ICA_MASK_NAME}  # written before training, not by the final save
# What a run writes before it trains (and recomputes when run again): not output of its own.
NOT_OUTPUT = {RUN_CONFIG_NAME, ICA_MASK_NAME, STAGING_NAME}


def check_output_dir(path: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse a file, a folder that holds files fn-train did not write, and one that holds an
    earlier run's output (checkpoints or final files) unless it is to be replaced or resumed."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {path} is a file; give a folder")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not (path / RUN_CONFIG_NAME).is_file():
        first = sorted(p.name for p in path.iterdir())[0]
        raise UserError(
            f"--output_dir {path} exists and holds {first}, which fn-train did not write; give a new or empty folder"
        )
    earlier = sorted(p.name for p in path.iterdir() if p.name not in NOT_OUTPUT)
    if earlier and not (overwrite or resuming):
        raise UserError(
            f"--output_dir {path} holds an earlier run's output ({', '.join(earlier[:3])}"
            f"{', ...' if len(earlier) > 3 else ''}); give a new folder, add --overwrite_output_dir to replace it, "
            "or --resume_from_checkpoint last to continue it"
        )


def clear_output_dir(path: Path) -> None:
    """Remove an earlier run's files and checkpoints (--overwrite_output_dir), so that none of
    them is left beside this run's."""
    for item in path.iterdir() if path.is_dir() else ():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


def has_checkpoint(path: Path) -> bool:
    return any(p.is_dir() for p in path.glob(f"{CHECKPOINT_PREFIX}*"))


@contextmanager
def removed_on_failure(path: Path, main_process: bool) -> Iterator[None]:
    """If the block fails, remove `path` when this run created it and no checkpoint is in it
    (a checkpoint is kept: the run can be resumed from it)."""
    existed = path.exists()
    try:
        yield
    except BaseException:
        if main_process and not existed and path.is_dir() and not has_checkpoint(path):
            shutil.rmtree(path, ignore_errors=True)
        raise


@contextmanager
def staged_save(output_dir: Path) -> Iterator[Path]:
    """A staging folder for the final save; on success its files replace the folder's
    previous final files (checkpoints, the run config and the ICA mask stay)."""
    stage = output_dir / STAGING_NAME
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
        new = {p.name for p in stage.iterdir()}
        for old in output_dir.iterdir():
            if old.is_file() and old.name not in new and old.name not in KEPT_ACROSS_SAVES:
                old.unlink()
        for item in stage.iterdir():
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
