"""Tests for the synthetic demo data generator."""

from __future__ import annotations

import csv
import json
import re

import pytest

from fn_analyze.demo_data import FAMILIES, QA, generate, write_demo_data
from shared.errors import UserError

ARITHMETIC = re.compile(r"^What is (\d+) (plus|minus|times) (\d+)\?$")


def _questions(path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        return [row["question"] for row in csv.DictReader(f)]


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = write_demo_data(tmp_path / "a", seed=7)
    b = write_demo_data(tmp_path / "b", seed=7)
    c = write_demo_data(tmp_path / "c", seed=8)
    assert set(a) == {"collect", "train", "eval", "sentiment", "general"}
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes()
        assert a[key].read_bytes() != c[key].read_bytes()
    assert generate(50, seed=1) == generate(50, seed=1)
    assert generate(50, seed=1) != generate(50, seed=2)


def test_files_shapes_and_families(tmp_path):
    paths = write_demo_data(tmp_path / "new" / "dir", seed=0, n_collect=40, n_train=20, n_eval=12)
    records = [json.loads(line) for line in paths["collect"].read_text(encoding="utf-8").splitlines()]
    assert len(records) == 40
    assert all(set(r) == {"question", "answer"} for r in records)  # nothing the tools ignore, so no warning
    assert paths["train"].read_text(encoding="utf-8").splitlines()[0] == "question,answer"
    assert len(_questions(paths["train"])) == 20
    assert len(_questions(paths["eval"])) == 12
    # the three files are drawn from different derived seeds
    assert [r["question"] for r in records[:12]] != _questions(paths["train"])[:12]


def test_train_csv_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = write_demo_data(tmp_path, seed=3, n_collect=8, n_train=30, n_eval=10)
    loaded = datasets.load_dataset("csv", data_files=str(paths["train"]), cache_dir=str(tmp_path / "cache"))
    assert loaded["train"].column_names == ["question", "answer"]
    assert loaded["train"].num_rows == 30


def test_train_and_eval_disjoint(tmp_path):
    paths = write_demo_data(tmp_path, seed=11)
    train, evaluation = _questions(paths["train"]), _questions(paths["eval"])
    assert (len(train), len(evaluation)) == (200, 100)
    assert not set(train) & set(evaluation)


def test_every_family_present_round_robin():
    data = generate(12, seed=5)
    assert [qa.family for qa in data] == list(FAMILIES) * 3
    assert all(isinstance(qa, QA) and qa.question and qa.answer for qa in data)
    only = generate(6, seed=5, families=("sentiment", "facts"))
    assert [qa.family for qa in only] == ["sentiment", "facts"] * 3


def test_no_duplicates_when_space_allows_and_graceful_fallback():
    data = generate(400, seed=2)
    assert len({qa.question for qa in data}) == 400
    many = generate(300, seed=2, families=("facts",))  # more than the facts table holds
    assert len(many) == 300
    assert len({qa.question for qa in many}) < 300


def test_arithmetic_answers_are_correct():
    data = generate(200, seed=9, families=("arithmetic",))
    for qa in data:
        match = ARITHMETIC.match(qa.question)
        assert match, qa.question
        a, op, b = int(match[1]), match[2], int(match[3])
        assert a < 20 and b < 20
        expected = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        assert qa.answer == str(expected)


def test_sentiment_answers_are_labels():
    data = generate(200, seed=4, families=("sentiment",))
    assert {qa.answer for qa in data} == {"positive", "negative"}
    assert all(qa.question.startswith("Is the sentiment of this review positive or negative?") for qa in data)


def test_continuation_examples():
    data = generate(100, seed=6, families=("continuation",))
    assert all(qa.question.endswith(",") and qa.answer for qa in data)
    numeric = [qa for qa in data if qa.answer.isdigit() and re.search(r"\d+,$", qa.question)]
    assert numeric
    for qa in numeric:
        nums = [int(x) for x in re.findall(r"\d+", qa.question)]
        assert int(qa.answer) - nums[-1] == nums[-1] - nums[-2]


def test_unknown_family_and_bad_n_raise():
    with pytest.raises(UserError, match="poetry") as info:
        generate(5, families=("facts", "poetry"))
    assert "arithmetic" in str(info.value)
    with pytest.raises(UserError):
        generate(0)
    with pytest.raises(UserError):
        generate(-3)


def test_sentiment_csv_is_classification_data_disjoint_from_train(tmp_path):
    from shared.data import DataFormat, detect_format, load_dataset_any, to_example

    paths = write_demo_data(tmp_path, seed=0, n_collect=8, n_train=40, n_eval=10, n_sentiment=30)
    loaded = load_dataset_any(str(paths["sentiment"]))["train"]
    assert loaded.column_names == ["question", "choices", "answer"] and len(loaded) == 30
    assert detect_format(loaded.column_names) is DataFormat.MULTIPLE_CHOICE
    examples = [to_example(record, DataFormat.MULTIPLE_CHOICE) for record in loaded]
    assert {e.choices for e in examples} == {("negative", "positive")}
    assert {e.answer for e in examples} == {"negative", "positive"}
    assert all(e.messages[0]["content"].startswith("Is the sentiment of this review") for e in examples)
    assert not {e.messages[0]["content"] for e in examples} & set(_questions(paths["train"]))


def test_adding_sentiment_csv_left_the_other_files_as_they_were(tmp_path):
    """sentiment.csv's seed is drawn after the others': the demo's mask file stays reproducible."""
    import random

    from fn_analyze.demo_data import FAMILIES, _generate

    paths = write_demo_data(tmp_path, seed=0, n_collect=20, n_train=10, n_eval=5)
    derive = random.Random(0)
    seed_collect, seed_train, seed_eval = (derive.getrandbits(63) for _ in range(3))
    assert [qa.question for qa in generate(10, seed_train)] == _questions(paths["train"])
    train = {qa.question for qa in generate(10, seed_train)}
    expected = _generate(5, random.Random(seed_eval), FAMILIES, frozenset(train))
    assert [qa.question for qa in expected] == _questions(paths["eval"])


def test_families_leave_a_retention_set(tmp_path) -> None:
    """Without sentiment in train.csv and eval.csv, sentiment.csv is a task the training never saw."""
    import csv

    paths = write_demo_data(tmp_path, seed=0, n_collect=8, n_train=30, n_eval=9, families=("facts", "arithmetic"))
    for role in ("train", "eval"):
        with paths[role].open() as handle:
            answers = [row["answer"] for row in csv.DictReader(handle)]
        assert answers and not {"positive", "negative"} & set(answers)
    assert len(paths["sentiment"].read_text().splitlines()) == 101


# sha256 prefixes of the files of write_demo_data(seed=5, n_collect=20, n_train=10, n_eval=6, n_sentiment=8)
# as written before general.jsonl existed
DIGESTS_BEFORE_GENERAL = {
    "collect": "4c11341a511fe08f",
    "train": "6e3ef745302c6d6f",
    "eval": "5a001e489a86c723",
    "sentiment": "f68fcf7dedfdf8ec",
}


def _texts(path) -> list[str]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(list(record) == ["text"] for record in records)  # plain text, nothing the tools ignore
    return [record["text"] for record in records]


def test_adding_general_jsonl_left_the_other_files_as_they_were(tmp_path) -> None:
    """general.jsonl's seed is drawn after the others': the files before it are byte for byte the same."""
    import hashlib

    paths = write_demo_data(tmp_path, seed=5, n_collect=20, n_train=10, n_eval=6, n_sentiment=8)
    digests = {role: hashlib.sha256(paths[role].read_bytes()).hexdigest()[:16] for role in DIGESTS_BEFORE_GENERAL}
    assert digests == DIGESTS_BEFORE_GENERAL
    assert paths["general"].name == "general.jsonl" and paths["general"].is_file()


def test_general_jsonl_is_varied_plain_prose_deterministic_from_the_seed(tmp_path) -> None:
    from fn_analyze.demo_prose import MAX_SENTENCES, MIN_SENTENCES, TOPICS

    pool = {sentence for sentences in TOPICS.values() for sentence in sentences}
    assert len(pool) == sum(len(sentences) for sentences in TOPICS.values()) >= 100  # no sentence written twice
    a = _texts(write_demo_data(tmp_path / "a", seed=7)["general"])
    b = _texts(write_demo_data(tmp_path / "b", seed=7)["general"])
    c = _texts(write_demo_data(tmp_path / "c", seed=8, n_general=30)["general"])
    assert a == b and len(a) == 100 and len(c) == 30
    assert a[:30] != c
    split = [re.split(r"(?<=\.) ", text) for text in a]
    for sentences in split:
        assert set(sentences) <= pool  # whole hand-written sentences, joined by single spaces
        assert MIN_SENTENCES <= len(set(sentences)) == len(sentences) <= MAX_SENTENCES
        assert len({topic for topic, written in TOPICS.items() if set(sentences) & set(written)}) == 1
    assert not any("?" in text or "positive" in text or "negative" in text for text in a)  # no task's format
    for i, first in enumerate(split):  # no near-duplicates: two records share at most one sentence
        for second in split[i + 1 :]:
            assert len(set(first) & set(second)) <= 1
    used = {sentence for sentences in split for sentence in sentences}
    assert len(used) >= 0.9 * len(pool)
    with pytest.raises(UserError, match="general-text"):
        write_demo_data(tmp_path / "d", n_collect=4, n_train=4, n_eval=4, n_sentiment=4, n_general=0)


def test_general_jsonl_is_scored_on_every_token(tmp_path, tiny_tokenizer) -> None:
    """A `text` column is plain text: evaluation scores the loss on every token, with no prompt."""
    from fn_analyze.measure.scoring import load_eval_set

    paths = write_demo_data(tmp_path, seed=0, n_collect=4, n_train=4, n_eval=4, n_sentiment=4, n_general=12)
    eval_set = load_eval_set(str(paths["general"]), tiny_tokenizer)
    assert eval_set.data_format == "text" and not eval_set.has_answers
    assert len(eval_set.rows) == 12 and all(row.n_prompt == 0 for row in eval_set.rows)
    assert eval_set.n_answer_tokens == sum(len(row.input_ids) - 1 for row in eval_set.rows)


def test_demo_data_command_writes_general_jsonl(tmp_path) -> None:
    from typer.testing import CliRunner

    from fn_analyze.cli import app

    args = ["demo-data", "--out", str(tmp_path), "--n-collect", "4", "--n-train", "4", "--n-eval", "4"]
    result = CliRunner().invoke(app, [*args, "--n-sentiment", "4", "--n-general", "5"])
    assert result.exit_code == 0, result.output
    assert f"general: {tmp_path / 'general.jsonl'}" in result.output
    assert len(_texts(tmp_path / "general.jsonl")) == 5
    help_text = CliRunner().invoke(app, ["demo-data", "--help"]).output
    assert "general.jsonl" in help_text and "--n-general" in help_text
