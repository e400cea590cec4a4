"""One syntax for lists of numbers in every flag and config key: `0,2-5,8` (ranges include their
end); the old `a:b` form, empty items, reversed ranges and negatives are refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fn_analyze.config import IcaParams
from fn_analyze.record.collect import parse_layers
from fn_train.experiment.config import ExperimentConfig
from shared.errors import ParameterError, UserError
from shared.masks import MASSIVE, parse_network_ids
from shared.numbers import parse_numbers

LIST = "0,2-5,8"
NUMBERS = [0, 2, 3, 4, 5, 8]


def _experiment(tmp_path: Path, demo_dir: Path, **settings) -> ExperimentConfig:
    return ExperimentConfig(
        train_data=str(demo_dir / "train.csv"),
        eval_data=str(demo_dir / "eval.csv"),
        retention_data=str(demo_dir / "sentiment.csv"),
        out=tmp_path / "out",
        arms=["lora"],
        **settings,
    )


def test_every_flag_and_key_reads_one_syntax(tmp_path: Path, demo_dir: Path) -> None:
    assert parse_numbers(LIST, "x") == NUMBERS
    assert parse_numbers(" 8, 0 ,2-5,3 ", "x") == NUMBERS  # sorted, each once
    assert parse_numbers([8, 0, 2, 3, 4, 5], "x") == NUMBERS and parse_numbers(4, "x") == [4]
    assert parse_numbers(None, "x") == parse_numbers("", "x") == []
    assert parse_layers(LIST, 10) == NUMBERS
    assert parse_network_ids(LIST) == NUMBERS
    assert parse_network_ids(f"{LIST},Massive") == [*NUMBERS, MASSIVE]
    params = IcaParams(exclude_positions=LIST, exclude_token_ids=LIST)
    assert params.exclude_positions == params.exclude_token_ids == NUMBERS
    config = _experiment(tmp_path, demo_dir, seeds=LIST, networks=LIST)
    assert config.seeds == NUMBERS and config.networks == LIST


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2:5", "layers 2:5 uses the old a:b range (end excluded); write 2-4 (end included)"),
        ("0,2:5,8", "layers 2:5 uses the old a:b range (end excluded); write 2-4 (end included)"),
        ("3:4", "layers 3:4 uses the old a:b range (end excluded); write 3 (end included)"),
        ("-2:", "layers -2: uses the old a:b range (end excluded); write a-b, e.g. 2-4 (end included)"),
        ("0,,2", "layers '0,,2' has an empty item; write numbers such as 0,2-5,8"),
        ("1,", "layers '1,' has an empty item; write numbers such as 0,2-5,8"),
        ("5-3", "layers '5-3': range 5-3 is reversed; write 3-5 (end included)"),
        ("-1", "layers '-1': -1 is negative; numbers start at 0"),
        ("x", "layers 'x': 'x' is not a number or range; write numbers such as 0,2-5,8"),
        ([1, -2], "layers takes non-negative integers, got -2"),
        (1.5, "layers must be integers such as 0,2-5,8, got 1.5"),
    ],
)
def test_bad_lists_are_refused_in_one_line(value, message: str) -> None:
    with pytest.raises(ParameterError) as info:
        parse_numbers(value, "layers")
    assert str(info.value) == message and "\n" not in message
    assert info.value.as_flags() == f"--{message}"


def test_each_caller_names_its_own_parameter(tmp_path: Path, demo_dir: Path) -> None:
    with pytest.raises(ParameterError, match=r"^layers 2:5 uses the old a:b range"):
        parse_layers("2:5", 10)
    with pytest.raises(ParameterError, match=r"^networks 2:5 uses the old a:b range .*write 2-4"):
        parse_network_ids("0,2:5")
    with pytest.raises(ParameterError, match=r"^networks 'massive,' has an empty item; .* or massive$"):
        parse_network_ids("massive,")
    with pytest.raises(ParameterError, match=r"^exclude_token_ids '1-0': range 1-0 is reversed"):
        IcaParams(exclude_token_ids="1-0")
    # The experiment's file names its keys, not a command's flags.
    for key in ("seeds", "networks"):
        with pytest.raises(UserError) as info:
            _experiment(tmp_path, demo_dir, **{key: "0:3"})
        assert str(info.value) == f"{key} 0:3 uses the old a:b range (end excluded); write 0-2 (end included)"
