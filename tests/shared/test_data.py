"""Datasets: formats detected from columns, rendered as training sees them, splits, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fn_train.data import build_datasets
from shared.data import DataFormat, detect_format, load_dataset_any, prompt_completion, render_text, to_example
from shared.errors import UserError
from shared.models import load_tokenizer


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["question", "answer"], DataFormat.QA),
        (["instruction", "input", "output"], DataFormat.ALPACA),
        (["instruction", "output"], DataFormat.ALPACA),
        (["prompt", "completion"], DataFormat.PROMPT_COMPLETION),
        (["prompt", "response"], DataFormat.PROMPT_RESPONSE),
        (["messages"], DataFormat.MESSAGES),
        (["text", "id"], DataFormat.TEXT),
    ],
)
def test_formats_are_detected(columns: list[str], expected: DataFormat) -> None:
    assert detect_format(columns) is expected


def test_unknown_columns_and_wrong_requested_format() -> None:
    with pytest.raises(UserError, match="columns a, b, which match no known format"):
        detect_format(["a", "b"])
    with pytest.raises(UserError, match="lacks column\\(s\\) answer needed by format qa"):
        detect_format(["question"], "qa")


def test_examples_render_per_template(tiny_lm_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    alpaca = to_example({"instruction": "Add.", "input": "2 and 3", "output": "5"}, DataFormat.ALPACA)
    assert alpaca.messages[0]["content"] == "Add.\n\n2 and 3" and alpaca.answer == "5"
    chat = prompt_completion(alpaca, "chat")
    assert chat["prompt"] == [{"role": "user", "content": "Add.\n\n2 and 3"}]
    assert chat["completion"] == [{"role": "assistant", "content": "5"}]
    assert "### Instruction:\nAdd." in prompt_completion(alpaca, "alpaca")["prompt"]
    assert prompt_completion(alpaca, "plain") == {"prompt": "Add.\n\n2 and 3\n", "completion": "5"}
    text = render_text(alpaca, "chat", tokenizer)
    assert text == "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    messages = to_example(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        DataFormat.MESSAGES,
    )
    assert messages.answer == "hello" and len(messages.messages) == 1
    assert prompt_completion(to_example({"text": "free text"}, DataFormat.TEXT), "chat") == {"text": "free text"}


def test_validation_split_is_seeded_and_an_existing_one_is_used(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    train_a, eval_a, template = build_datasets(str(demo_dir / "train.csv"), "auto", "auto", tokenizer, 0.25, seed=3)
    train_b, eval_b, _ = build_datasets(str(demo_dir / "train.csv"), "auto", "auto", tokenizer, 0.25, seed=3)
    assert template == "chat" and len(eval_a) == 8 and len(train_a) == 24
    assert eval_a["prompt"] == eval_b["prompt"]
    _, eval_c, _ = build_datasets(str(demo_dir / "train.csv"), "auto", "auto", tokenizer, 0.25, seed=4)
    assert eval_c["prompt"] != eval_a["prompt"]

    folder = tmp_path / "with_validation"
    folder.mkdir()
    for split, rows in (
        ("train", [{"prompt": "p", "completion": "c"}] * 3),
        ("validation", [{"prompt": "v", "completion": "w"}]),
    ):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train, evaluation, _ = build_datasets(str(folder), "auto", "plain", tokenizer, 0.5, seed=0)
    assert len(train) == 3 and train[0] == {"prompt": "p\n", "completion": "c"}
    assert len(evaluation) == 1 and evaluation[0] == {"prompt": "v\n", "completion": "w"}  # not re-split


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "does not exist"),
        ("empty.csv", "", "is empty"),
        ("data.txt", "hello", "unknown file type '.txt'"),
        ("header_only.csv", "question,answer\n", "has no records"),
    ],
)
def test_bad_dataset_files(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_dataset_any(str(path))


def test_multiple_choice_is_detected_before_question_answer() -> None:
    assert detect_format(["question", "choices", "answer"]) is DataFormat.MULTIPLE_CHOICE
    assert detect_format(["question", "answer"]) is DataFormat.QA
    assert detect_format(["question", "choices", "answer"], "qa") is DataFormat.QA  # asked for: choices ignored


@pytest.mark.parametrize(
    ("choices", "answer", "gold"),
    [
        (["negative", "positive"], 1, 1),  # an index
        (["negative", "positive"], "negative", 0),  # a choice's text
        ('["negative", "positive"]', "1", 1),  # a CSV cell: a JSON list, the index as text
        ("cold|warm|hot", 2.0, 2),  # a|b|c; a float index as some readers give it
        (["1", "2", "3"], "2", 1),  # text first: "2" is the choice "2", not index 2
    ],
)
def test_multiple_choice_records_read_choices_and_answer(choices, answer, gold: int) -> None:
    example = to_example({"question": "Q?", "choices": choices, "answer": answer}, DataFormat.MULTIPLE_CHOICE)
    assert example.gold == gold and example.answer == example.choices[gold]
    assert example.messages == ({"role": "user", "content": "Q?"},)


@pytest.mark.parametrize(
    ("choices", "answer", "message"),
    [
        (["a", "b"], 2, "answer 2 is neither one of its choices \\(a, b\\) nor an index below 2"),
        (["a", "b"], "c", "answer 'c' is neither one of its choices"),
        (["only"], 0, "choices must be a list of at least two"),
        ('["a", "b"', 0, "is not a JSON list"),
    ],
)
def test_bad_multiple_choice_records_are_refused(choices, answer, message: str) -> None:
    with pytest.raises(UserError, match=message):
        to_example({"question": "Q?", "choices": choices, "answer": answer}, DataFormat.MULTIPLE_CHOICE)


def test_ignored_columns_are_named_in_a_warning(caplog) -> None:
    with caplog.at_level("WARNING", logger="shared.data"):
        detect_format(["question", "answer", "family", "id"], source="dataset x.csv")
    assert "dataset x.csv: column(s) family, id ignored (format qa reads question, answer)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="shared.data"):
        detect_format(["instruction", "input", "output"])
        detect_format(["question", "choices", "answer"])
    assert "ignored" not in caplog.text


def test_multiple_choice_csv_trains_on_the_right_choice(tiny_lm_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    data = tmp_path / "mc.csv"
    data.write_text('question,choices,answer\nIs it good?,"[""negative"", ""positive""]",1\nIs it bad?,no|yes,yes\n')
    train, _, _ = build_datasets(str(data), "auto", "plain", tokenizer, 0.0, seed=0)
    assert [row["completion"] for row in train] == ["positive", "yes"]  # not the index "1"


def test_column_names_are_matched_without_regard_to_case(tmp_path: Path, tiny_lm_dir: Path, caplog) -> None:
    """`Question,Answer` is question/answer data; the log names the columns read, as spelled."""
    from shared.examples import load_examples

    data = tmp_path / "mine.csv"
    data.write_text("Question,ANSWER,Notes\nWhat is 2+2?,4,easy\n", encoding="utf-8")
    with caplog.at_level("INFO"):
        examples = load_examples(str(data), load_tokenizer(str(tiny_lm_dir)))
    assert examples.data_format is DataFormat.QA
    assert [(e.messages[0]["content"], e.answer) for e in examples] == [("What is 2+2?", "4")]
    assert f"dataset {data}: format qa, read from column(s) Question, ANSWER" in caplog.text
    assert "column(s) Notes ignored" in caplog.text
