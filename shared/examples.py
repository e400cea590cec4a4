"""The one way to read a dataset's examples: load it, pick its split, detect its format and
pick the template, for collect, evaluate and fn-train alike."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from shared.data import (
    FORMAT_COLUMNS,
    OPTIONAL_COLUMNS,
    DataFormat,
    Example,
    case_renames,
    detect_format,
    load_dataset_any,
    resolve_template,
    to_example,
)

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

HELD_OUT_SPLITS = ("validation", "valid", "val", "test", "eval")  # held-out splits, by these names, in this order

Purpose = Literal["train", "evaluate"]


@dataclass(frozen=True)
class Examples:
    """One split of a dataset, with the format its records were read in and the template they
    are rendered with (see `shared.data.render_text`)."""

    source: str
    split: str
    data_format: DataFormat
    template: str
    records: datasets.Dataset
    held_out: datasets.Dataset | None = None  # purpose "train": the held-out split beside `split`, if any

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Example]:
        return (to_example(record, self.data_format) for record in self.records)

    def head(self, limit: int | None) -> Examples:
        """The first `limit` records (all of them for None)."""
        if limit is None:
            return self
        return replace(self, records=self.records.select(range(min(limit, len(self.records)))))


def training_split(splits: Sequence[str]) -> str:
    """`train` when the dataset has it, else its first split."""
    return "train" if "train" in splits else splits[0]


def held_out_split(splits: Sequence[str], besides: str | None = None) -> str | None:
    """The first of HELD_OUT_SPLITS the dataset has, other than `besides`; None when none."""
    return next((name for name in HELD_OUT_SPLITS if name in splits and name != besides), None)


def load_examples(
    source: str,
    tokenizer: Any,
    split: str | None = None,
    purpose: Purpose = "train",
    data_format: str = "auto",
    template_format: str = "auto",
) -> Examples:
    """The examples of one split of `source` (a csv/json/jsonl/parquet file, a folder of them,
    or a HF dataset name), their format (`data_format`, detected for "auto") and template
    (`template_format`, resolved against `tokenizer`).

    The split rule, the only one:
    - a `split` given is read as it is (an error names the splits the dataset has);
    - otherwise, records to learn from (`purpose` "train": fn-train, and collect, which records
      what training learns from) come from `train`, else from the first split; the first of
      HELD_OUT_SPLITS the dataset has besides that one is `held_out` (fn-train validates on it);
    - records to evaluate on (`purpose` "evaluate") come from the first of HELD_OUT_SPLITS the
      dataset has, else from the split training would learn from.
    """
    loaded = load_dataset_any(source, split)
    splits = list(loaded)
    held_out = None
    if split is None and purpose == "evaluate":
        split = held_out_split(splits) or training_split(splits)
    elif split is None:
        split = training_split(splits)
        held_out_name = held_out_split(splits, besides=split)
        held_out = loaded[held_out_name] if held_out_name is not None else None
    records = loaded[split]
    renames = case_renames(records.column_names)  # `Question` is read as `question`
    if renames:
        records = records.rename_columns(renames)
        if held_out is not None:
            held_out = held_out.rename_columns({k: v for k, v in renames.items() if k in held_out.column_names})
    fmt = detect_format(records.column_names, data_format, source=f"dataset {source}")
    spelled = {v: k for k, v in renames.items()}
    read = [spelled.get(c, c) for c in records.column_names if c in FORMAT_COLUMNS[fmt] + OPTIONAL_COLUMNS.get(fmt, ())]
    log.info("dataset %s: format %s, read from column(s) %s", source, fmt.value, ", ".join(read))
    template = resolve_template(template_format, tokenizer)
    return Examples(source, split, fmt, template, records, held_out)
