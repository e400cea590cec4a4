"""Datasets: load local files or HF names, detect the record format, render examples as text.

Collection and training render examples the same way (`render_text` is the
concatenation of what training sees as prompt and completion), so a mask is measured
on the same signal it is later applied to.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from shared.errors import UserError

log = logging.getLogger(__name__)

LOCAL_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataFormat(str, Enum):
    MULTIPLE_CHOICE = "multiple_choice"  # question, choices, answer (an index or a choice's text)
    QA = "qa"  # question, answer
    ALPACA = "alpaca"  # instruction, [input], output
    PROMPT_COMPLETION = "prompt_completion"  # prompt, completion
    PROMPT_RESPONSE = "prompt_response"  # prompt, response
    MESSAGES = "messages"  # messages: [{role, content}, ...]
    TEXT = "text"  # text


# Checked in this order: the first format whose columns are all present wins.
FORMAT_COLUMNS: dict[DataFormat, tuple[str, ...]] = {
    DataFormat.MESSAGES: ("messages",),
    DataFormat.ALPACA: ("instruction", "output"),
    DataFormat.MULTIPLE_CHOICE: ("question", "choices", "answer"),  # before qa: a qa file with choices is this
    DataFormat.QA: ("question", "answer"),
    DataFormat.PROMPT_COMPLETION: ("prompt", "completion"),
    DataFormat.PROMPT_RESPONSE: ("prompt", "response"),
    DataFormat.TEXT: ("text",),
}

# Columns a format reads beyond the ones it needs; any other column is ignored, with a warning.
OPTIONAL_COLUMNS: dict[DataFormat, tuple[str, ...]] = {DataFormat.ALPACA: ("input",)}

TEMPLATES = ("auto", "chat", "alpaca", "plain")
ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


@dataclass(frozen=True)
class Example:
    """One record, normalized: a conversation before the answer, and the answer to learn.

    Plain-text records have no answer: `messages` is empty and `text` holds them.
    """

    messages: tuple[dict[str, str], ...]
    answer: str | None
    text: str | None = None
    choices: tuple[str, ...] | None = None  # multiple choice: every choice; `answer` is choices[gold]
    gold: int | None = None


def load_dataset_any(source: str, split: str | None = None):
    """A `datasets.DatasetDict` from a local csv/json/jsonl/parquet file, a folder of them, or a HF dataset name."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir():  # a folder of data files; splits from their names (train.jsonl, validation.jsonl)
            loaded = datasets.load_dataset(str(path))
        elif is_local_file(source):
            loaded = datasets.load_dataset(check_local_file(source), data_files=str(path))
        else:
            loaded = datasets.load_dataset(source)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable input
        if "corresponds to no data" in str(exc):  # datasets' words for a file with a header and no row
            raise UserError(f"dataset {source} has no records; give a file with at least one record") from exc
        raise UserError(
            f"cannot read dataset {source!r} ({_root_cause(exc)}); give a readable local file or dataset name"
        ) from exc
    if split is not None:
        if split not in loaded:
            raise UserError(f"dataset {source!r} has no split {split!r} (splits: {', '.join(loaded)})")
        loaded = datasets.DatasetDict({split: loaded[split]})
    if all(len(part) == 0 for part in loaded.values()):
        raise UserError(f"dataset {source} has no records; give a file with at least one record")
    return loaded


def is_local_file(source: str) -> bool:
    """Whether `source` names a local data file (by its suffix, or because it exists and is no folder)
    rather than a folder of them or a Hugging Face dataset name."""
    path = Path(source)
    return not path.is_dir() and (path.suffix.lower() in LOCAL_BUILDERS or path.exists())


def split_prefix(source: str, split: str) -> str:
    """The split the rows came from, with its comma, for a table's header; nothing for a single data
    file, whose one split is only `datasets`' name for the whole file ("train", whatever it holds)."""
    return "" if is_local_file(source) else f"{split} split, "


def check_local_file(source: str) -> str:
    """The `datasets` builder that reads the local data file `source`; a UserError when it is
    missing, of an unknown type or empty."""
    path = Path(source)
    if not path.is_file():
        raise UserError(f"dataset {source} does not exist; give a csv, json, jsonl or parquet file")
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"dataset {source}: unknown file type {path.suffix!r}; use .csv, .json, .jsonl or .parquet")
    if path.stat().st_size == 0:
        raise UserError(f"dataset {source} is empty; give a file with at least one record")
    return builder


def peek_columns(source: str) -> list[str] | None:
    """The column names of a local data file, read from its first record without `datasets`
    (which takes seconds to import): a csv's header, the keys of a json(l) file's first record, a
    parquet file's schema. None when that cannot be told cheaply (a json file that is not one record
    per line, a first line that does not parse): the full read decides, and words the error."""
    path = Path(source)
    builder = check_local_file(source)
    try:
        if builder == "csv":
            with path.open(newline="", encoding="utf-8") as handle:
                return next(csv.reader(handle), None)
        if builder == "parquet":
            import pyarrow.parquet

            return list(pyarrow.parquet.read_schema(path).names)
        with path.open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        record = json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError, csv.Error):  # pyarrow's errors are ValueError or OSError
        return None
    return list(record) if isinstance(record, dict) else None


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost explicitly chained cause: datasets wraps a parse error
    ("JSON parse error: ... in row 0") in "An error occurred while generating the dataset"."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


KNOWN_COLUMNS = frozenset(c for columns in (*FORMAT_COLUMNS.values(), *OPTIONAL_COLUMNS.values()) for c in columns)


def case_renames(columns: list[str]) -> dict[str, str]:
    """The columns to rename so that a format's columns are matched without regard to case
    (`Question` -> `question`): each column whose lower case is a known column name, unless
    that name is already a column or another column has the same lower case."""
    lowered = [c.lower() for c in columns]
    return {
        c: c.lower()
        for c in columns
        if c != c.lower() and c.lower() in KNOWN_COLUMNS and c.lower() not in columns and lowered.count(c.lower()) == 1
    }


def detect_format(columns: list[str], requested: str = "auto", source: str = "dataset") -> DataFormat:
    """The record format from the column names, or check the one the user asked for; columns
    the format does not read are named in a warning."""
    fmt = format_of(columns, requested, source)
    read = FORMAT_COLUMNS[fmt] + OPTIONAL_COLUMNS.get(fmt, ())
    ignored = [c for c in columns if c not in read]
    if ignored:
        log.warning(
            "%s: column(s) %s ignored (format %s reads %s)", source, ", ".join(ignored), fmt.value, ", ".join(read)
        )
    return fmt


def format_of(columns: list[str], requested: str = "auto", source: str = "dataset") -> DataFormat:
    """`detect_format` without its warning about the columns the format does not read."""
    if requested != "auto":
        try:
            fmt = DataFormat(requested)
        except ValueError:
            names = ", ".join(f.value for f in DataFormat)
            raise UserError(f"unknown data format {requested!r}; use auto or one of {names}") from None
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in columns]
        if missing:
            raise UserError(
                f"{source} lacks column(s) {', '.join(missing)} needed by format {fmt.value} (it has "
                f"{', '.join(columns)}); pass --data-format auto or the format its columns match"
            )
        return fmt
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    known = "; ".join(f"{f.value}: {', '.join(c)}" for f, c in FORMAT_COLUMNS.items())
    raise UserError(
        f"{source} has columns {', '.join(columns)}, which match no known format; rename them to one of ({known})"
    )


def to_example(record: dict[str, Any], fmt: DataFormat) -> Example:
    def text_of(key: str) -> str:
        value = record.get(key)
        return "" if value is None else str(value)

    if fmt is DataFormat.TEXT:
        return Example((), None, text_of("text"))
    if fmt is DataFormat.MESSAGES:
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]]
        if messages and messages[-1]["role"] == "assistant":
            return Example(tuple(messages[:-1]), messages[-1]["content"])
        return Example(tuple(messages), None)
    if fmt is DataFormat.MULTIPLE_CHOICE:
        question = text_of("question")
        choices = parse_choices(record.get("choices"), question)
        gold = gold_index(record.get("answer"), choices, question)
        return Example(({"role": "user", "content": question},), choices[gold], choices=choices, gold=gold)
    if fmt is DataFormat.ALPACA:
        prompt = text_of("instruction")
        if text_of("input").strip():
            prompt = f"{prompt}\n\n{text_of('input')}"
        return Example(({"role": "user", "content": prompt},), text_of("output"))
    prompt_key, answer_key = {
        DataFormat.QA: ("question", "answer"),
        DataFormat.PROMPT_COMPLETION: ("prompt", "completion"),
        DataFormat.PROMPT_RESPONSE: ("prompt", "response"),
    }[fmt]
    return Example(({"role": "user", "content": text_of(prompt_key)},), text_of(answer_key))


def parse_choices(value: Any, question: str) -> tuple[str, ...]:
    """A record's choices: a list, or (as a CSV cell) a JSON list or `a|b|c`."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise UserError(
                    f"multiple-choice record {question[:50]!r}: choices {text[:60]!r} is not a JSON list; "
                    'write them as ["a", "b"] or a|b'
                ) from None
        else:
            value = text.split("|")
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise UserError(
            f"multiple-choice record {question[:50]!r}: choices must be a list of at least two, got {value!r}; "
            'write them as ["a", "b"] or a|b'
        )
    return tuple(str(choice) for choice in value)


def gold_index(answer: Any, choices: tuple[str, ...], question: str) -> int:
    """The right choice's index: an integer answer is an index; a string is matched against the
    choices' text first, then read as an index."""
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        if answer.strip().isdigit():
            answer = int(answer.strip())
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    raise UserError(
        f"multiple-choice record {question[:50]!r}: answer {answer!r} is neither one of its choices "
        f"({', '.join(choices)}) nor an index below {len(choices)}; give the index or the text of the right choice"
    )


def resolve_template(template: str, tokenizer) -> str:
    """`auto` is `chat` when the tokenizer has a chat template, else `plain`."""
    if template not in TEMPLATES:
        raise UserError(f"unknown template format {template!r}; use {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("--template-format chat: the tokenizer has no chat template; use plain or alpaca")
    return template


def _flatten(messages: tuple[dict[str, str], ...]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def prompt_completion(example: Example, template: str) -> dict[str, Any]:
    """The record TRL's SFTTrainer trains on: conversational for `chat`, strings otherwise.

    TRL computes the loss on the completion only and appends EOS to a string completion.
    """
    if example.text is not None:
        return {"text": example.text}
    if template == "chat":
        return {
            "prompt": list(example.messages),
            "completion": [{"role": "assistant", "content": example.answer or ""}],
        }
    if template == "alpaca":
        prompt = f"{ALPACA_HEADER}### Instruction:\n{_flatten(example.messages)}\n\n### Response:\n"
    else:
        prompt = f"{_flatten(example.messages)}\n"
    return {"prompt": prompt, "completion": example.answer or ""}


def render_prompt(example: Example, template: str, tokenizer) -> str | None:
    """What comes before the answer in `render_text`, up to the assistant turn's opening; None
    for a plain-text record, every token of which is learned."""
    record = prompt_completion(example, template)
    if "text" in record:
        return None
    if template == "chat":
        return tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    return record["prompt"]


def render_text(example: Example, template: str, tokenizer) -> str:
    """The whole example as one string, as training sees it (without the appended EOS)."""
    record = prompt_completion(example, template)
    if "text" in record:
        return record["text"]
    if template == "chat":
        return tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=False)
    return record["prompt"] + record["completion"]


def check_answers_fit(
    examples: list[Example], template: str, tokenizer, max_length: int, flag: str, source: str
) -> None:
    """Refuse data whose every prompt fills `max_length` tokens, so that truncation leaves no
    answer token: training would have nothing to learn (TRL drops such rows) and collect
    would record prompts only. Some rows like that get a warning. Plain text is truncated
    as it is: its first `max_length` tokens are the signal."""
    prompts = [text for text in (render_prompt(e, template, tokenizer) for e in examples) if text is not None]
    if not prompts:
        return
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    too_long = sum(length >= max_length for length in lengths)
    if too_long == len(lengths):
        raise UserError(
            f"{source}: every record's prompt is at least {flag} {max_length} tokens long (the shortest has "
            f"{min(lengths)}), so truncation leaves no answer token; raise {flag} above {min(lengths)}"
        )
    if too_long:
        log.warning(
            "%s: %d of %d records have a prompt of at least %s %d tokens; truncation cuts their answer off",
            source,
            too_long,
            len(lengths),
            flag,
            max_length,
        )
