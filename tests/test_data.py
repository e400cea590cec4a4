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
