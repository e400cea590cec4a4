"""Every config key of `fn-train experiment`, and fn-train's own --config file, refuse a value of the
wrong type in one line naming the key, with exit code 2, before anything runs or is written."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import fn_train.experiment.runner as runner_module
from fn_train.cli import app, experiment_app
from fn_train.config import TrainConfig
from fn_train.experiment.config import ExperimentConfig
from shared.config_types import read_yaml
from shared.options import option_spec
from tests.helpers.processes import refused

# Text that stays text in the config's YAML (`read_yaml` reads `0E0` or `1e5` as numbers, as YAML 1.2 does).
TEXT = st.text(min_size=1, max_size=8).filter(lambda text: read_yaml(yaml.safe_dump({"v": text}))["v"] == text)
WHOLE = st.integers(-(10**6), 10**6)
REAL = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
BOOL = st.booleans()
NULL = st.none()
LIST = st.lists(st.one_of(TEXT, WHOLE), max_size=3)
MAPPING = st.dictionaries(TEXT, WHOLE, max_size=2)


def _list_with(bad: st.SearchStrategy, good: st.SearchStrategy) -> st.SearchStrategy:
    """A list of good items with one bad one among them."""
    return st.tuples(st.lists(good, max_size=2), bad, st.lists(good, max_size=2)).map(lambda t: [*t[0], t[1], *t[2]])


NOT_WHOLE = [TEXT, REAL, BOOL, LIST, MAPPING]
NOT_NUMBER = [TEXT, BOOL, LIST, MAPPING]
NOT_TEXT = [WHOLE, REAL, BOOL, LIST, MAPPING]
NOT_MAPPING = [TEXT, WHOLE, REAL, BOOL, NULL, LIST]
# Each key's values of a wrong type: the kinds of value its field does not take.
WRONG: dict[str, list[st.SearchStrategy]] = {
    **dict.fromkeys(["steps", "batch_size", "eval_batch_size", "max_new_tokens", "max_seq_length"], NOT_WHOLE + [NULL]),
    **dict.fromkeys(["eval_limit", "retention_limit"], NOT_WHOLE),
    **dict.fromkeys(["learning_rate", "bin_width"], NOT_NUMBER + [NULL]),
    "scale_factor": NOT_NUMBER,
    **dict.fromkeys(["train_data", "eval_data", "model", "ablation", "device", "correction", "out"], NOT_TEXT + [NULL]),
    **dict.fromkeys(["eval_split", "mask_file", "activations"], NOT_TEXT),
    "networks": [REAL, BOOL, LIST, MAPPING],  # a whole number is one network's id, as fn-train --config reads it
    "generate": [TEXT, WHOLE, REAL, NULL, LIST, MAPPING],
    **dict.fromkeys(
        ["retention_data", "arms", "controls"],
        [WHOLE, REAL, BOOL, NULL, MAPPING, _list_with(st.one_of(WHOLE, BOOL, NULL, MAPPING), TEXT)],
    ),
    "seeds": [REAL, BOOL, NULL, MAPPING, _list_with(st.one_of(TEXT, REAL, BOOL, NULL), WHOLE)],
    "keystone": [MAPPING, _list_with(st.one_of(BOOL, LIST, MAPPING), WHOLE)],
    "train": NOT_MAPPING,
    "target_difference": NOT_MAPPING + [st.dictionaries(st.sampled_from(["loss", "accuracy"]), TEXT, min_size=1)],
}

VALID = {
    "train_data": "train.csv",
    "eval_data": "eval.csv",
    "retention_data": "sentiment.csv",
    "mask_file": "networks.fnmask",
    "arms": ["lora", "key"],
}


def test_every_key_has_wrong_values() -> None:
    assert set(WRONG) == {f.name for f in dataclasses.fields(ExperimentConfig)}


def _one_line_value(value: Any) -> str:
    """How the error line writes the value (its whitespace collapsed, as every error line's is)."""
    return " ".join(f"got {value!r}".split())


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_an_experiment_config_value_of_a_wrong_type_is_one_line_naming_the_key(tmp_path_factory, data) -> None:
    key = data.draw(st.sampled_from(sorted(WRONG)), label="key")
    value = data.draw(st.one_of(WRONG[key]), label="value")
    folder = tmp_path_factory.mktemp("typed")
    out = folder / "out"
    config = {**VALID, "out": str(out), key: value}
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner_module, "run_one", lambda *args: pytest.fail("a run started"))
        patch.setattr(runner_module, "prepare", lambda *args: pytest.fail("the base model was loaded"))
        line = refused(CliRunner().invoke(experiment_app, ["--config", str(path)]), f"{path}: {key} must be ")
    assert _one_line_value(yaml.safe_load(path.read_text(encoding="utf-8"))[key]) in line
    assert not out.exists()


def _train_numbers() -> dict[str, type]:
    """fn-train's options that a config file gives as a number: flag name -> int or float."""
    hints = typing.get_type_hints(TrainConfig)
    numbers = {}
    for field in dataclasses.fields(TrainConfig):
        spec = option_spec(field)
        if spec is not None and not spec.text and not spec.argument and hints[field.name] in (int, float):
            numbers[spec.flag or field.name] = hints[field.name]
    return numbers


TRAIN_NUMBERS = _train_numbers()


def test_fn_train_has_number_options() -> None:
    assert {"learning_rate": float, "max_steps": int}.items() <= TRAIN_NUMBERS.items()


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_fn_train_config_file_value_of_a_wrong_type_is_one_line_naming_the_key(tmp_path_factory, data) -> None:
    key = data.draw(st.sampled_from(sorted(TRAIN_NUMBERS)), label="key")
    value = data.draw(st.one_of(NOT_WHOLE if TRAIN_NUMBERS[key] is int else NOT_NUMBER), label="value")
    folder = tmp_path_factory.mktemp("typed")
    out = folder / "out"
    path = folder / "train.yaml"
    settings = {"model_name_or_path": "m", "dataset_name_or_path": "d.csv", "output_dir": str(out), key: value}
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    line = refused(CliRunner().invoke(app, ["--config", str(path)]), f"{path}: {key} must be ")
    assert _one_line_value(yaml.safe_load(path.read_text(encoding="utf-8"))[key]) in line
    assert not out.exists()


def test_a_config_file_reads_numbers_as_they_are_written(tmp_path: Path) -> None:
    """`networks: 3` is the text 3, as on the command line, and `2e-4` a number (YAML 1.2, not PyYAML's 1.1):
    the file gets past its type check to the wrong one."""
    path = tmp_path / "train.yaml"
    path.write_text("networks: 3\nlearning_rate: 2e-4\nmax_steps: many\n", encoding="utf-8")
    refused(CliRunner().invoke(app, ["--config", str(path)]), "max_steps must be a whole number")
    assert read_yaml("learning_rate: 2e-4\nrate: '2e-4'") == {"learning_rate": 2e-4, "rate": "2e-4"}


def test_the_line_gives_the_key_default_as_an_example(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**VALID, "out": str(tmp_path / "out"), "learning_rate": "fast"}), encoding="utf-8")
    line = refused(CliRunner().invoke(experiment_app, ["--config", str(path)]))
    assert line == f"error: --config {path}: learning_rate must be a number such as 0.0002, got 'fast'"


def test_one_network_id_as_a_number_is_read_as_fn_train_reads_it(tmp_path: Path) -> None:
    from fn_train.experiment.config import ExperimentConfig

    data = tmp_path / "d.csv"
    data.write_text("question,answer\na,b\n")
    config = ExperimentConfig(train_data=str(data), eval_data=str(data), retention_data=str(data),
                              out=tmp_path / "o", networks=3, arms=["lora"])  # fmt: skip
    assert config.networks == "3"
