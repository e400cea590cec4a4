"""A command's inputs checked before torch, transformers and datasets load.

Importing those takes seconds (more on a busy machine); a missing file, a dataset whose columns
match no format or the wrong kind of folder should be refused in well under one. The checks here
read only the file system and the first record of a data file; the command's own code checks
everything again, fully, when it reads its inputs (a HF dataset name, the records themselves,
whether a mask fits the model), so this is a shortcut to the same one-line refusals, never the
only check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.data import case_renames, format_of, is_local_file, peek_columns
from shared.masks import load_mask_file
from shared.models import check_model_reachable

# The fields of the commands' configs that name their inputs, by what they name.
_DATASETS = ("dataset", "dataset_name_or_path", "retention")
_MODELS = ("model", "model_name_or_path")
_MASK_FILES = ("mask_file",)


def check_dataset(source: str, data_format: str = "auto") -> None:
    """Refuse a local data file that is missing, empty, of an unknown type, or whose columns fit
    no format (or not the one asked for), in the words the full read would use."""
    if not is_local_file(source):
        return  # a folder of files or a HF dataset name: `datasets` reads it
    columns = peek_columns(source)
    if columns is not None:
        renamed = case_renames(columns)
        format_of([renamed.get(c, c) for c in columns], data_format, source=f"dataset {source}")


def check_inputs(settings: Any) -> None:
    """Check the inputs a command's settings (a dict, or a config) name: data files, the model and
    mask files. Fields it lacks or leaves empty are skipped. (fn-analyze checks an activations
    folder's manifest itself: shared does not import fn_analyze.)"""

    def value(name: str) -> Any:
        return settings.get(name) if isinstance(settings, dict) else getattr(settings, name, None)

    for name in _MODELS:
        if value(name) is not None:
            check_model_reachable(str(value(name)))
    for name in _MASK_FILES:
        if value(name) is not None:
            load_mask_file(Path(value(name)))
    for name in _DATASETS:
        if value(name) is not None:
            check_dataset(str(value(name)), (value("data_format") or "auto") if name != "retention" else "auto")
