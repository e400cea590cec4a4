"""Training and validation sets in the form TRL's SFTTrainer takes (prompt/completion or text)."""

from __future__ import annotations

import datasets

from shared.data import check_answers_fit, prompt_completion, to_example
from shared.errors import UserError
from shared.examples import load_examples


def build_datasets(
    source: str,
    data_format: str,
    template_format: str,
    tokenizer,
    validation_split: float,
    seed: int,
    max_length: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None, str]:
    """(train, eval or None, template used). The splits are `shared.examples.load_examples`'s:
    a held-out split of the dataset is used as it is; without one, `validation_split` > 0
    holds out a seeded, shuffled share of the training rows. With `max_length`, training data
    whose every prompt fills it is refused."""
    data = load_examples(source, tokenizer, data_format=data_format, template_format=template_format)
    fmt, template = data.data_format, data.template
    if max_length is not None:
        check_answers_fit(list(data), template, tokenizer, max_length, "--max_seq_length", f"dataset {source}")
    train, evaluation = data.records, data.held_out
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


def leading_sequences(train_dataset: datasets.Dataset, max_tokens: int) -> list[list[int]]:
    """The first tokenized training rows, until `max_tokens` tokens are reached (the rows as training
    renders them, for a pass of the base model over them: neuron means or magnitudes)."""
    sequences, total = [], 0
    for ids in train_dataset["input_ids"]:
        if total >= max_tokens:
            break
        sequences.append(list(ids))
        total += len(ids)
    return sequences
