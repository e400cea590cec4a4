"""Training and validation sets in the form TRL's SFTTrainer takes (prompt/completion or text)."""

from __future__ import annotations

import datasets

from shared.data import (
    VALIDATION_SPLITS,
    check_answers_fit,
    detect_format,
    load_dataset_any,
    prompt_completion,
    resolve_template,
    to_example,
)
from shared.errors import UserError


def build_datasets(
    source: str,
    data_format: str,
    template_format: str,
    tokenizer,
    validation_split: float,
    seed: int,
    max_length: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None, str]:
    """(train, eval or None, template used). An existing validation split is used as it is;
    otherwise `validation_split` > 0 holds out a seeded, shuffled share of the training rows.
    With `max_length`, training data whose every prompt fills it is refused."""
    loaded = load_dataset_any(source)
    train_name = "train" if "train" in loaded else next(iter(loaded))
    train = loaded[train_name]
    fmt = detect_format(train.column_names, data_format, source=f"dataset {source}")
    template = resolve_template(template_format, tokenizer)
    if max_length is not None:
        examples = [to_example(record, fmt) for record in train]
        check_answers_fit(examples, template, tokenizer, max_length, "--max_seq_length", f"dataset {source}")
    eval_name = next((name for name in VALIDATION_SPLITS if name in loaded and name != train_name), None)
    evaluation = loaded[eval_name] if eval_name else None
    if evaluation is None and validation_split > 0:
        if len(train) < 2:
            raise UserError(f"dataset {source} has {len(train)} row(s), too few for --validation_split")
        parts = train.train_test_split(test_size=validation_split, seed=seed, shuffle=True)
        train, evaluation = parts["train"], parts["test"]

    def convert(part: datasets.Dataset) -> datasets.Dataset:
        return part.map(
            lambda record: prompt_completion(to_example(record, fmt), template),
            remove_columns=part.column_names,
        )

    return convert(train), convert(evaluation) if evaluation is not None else None, template
