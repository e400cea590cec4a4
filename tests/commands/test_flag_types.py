"""Flags given a value of the wrong type (text where a number goes, a fraction where a whole number goes)
are refused like every other bad input: exit 2, one line, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fn_analyze.cli import app as analyze_app
from fn_train.cli import app as train_app
from tests.helpers.processes import refused

runner = CliRunner()
NOT_A_NUMBER = st.text(alphabet="abcxyz,;:_ ", min_size=1, max_size=6).filter(lambda s: s.strip() != "")
NOT_WHOLE = st.one_of(NOT_A_NUMBER, st.sampled_from(["1.5", "0.25", "2e-3", "three"]))
# (command, its other arguments, a flag that takes a whole number, one that takes a number)
COMMANDS = [
    (train_app, ["--model_name_or_path", "m", "--dataset_name_or_path", "d.csv"], "--max_steps", "--learning_rate"),
    (analyze_app, ["evaluate", "--mask-file", "m.json", "--dataset", "d.csv"], "--draws", "--bin-width"),
    (analyze_app, ["collect", "--dataset", "d.csv"], "--batch-size", None),
    (analyze_app, ["ica", "--activations", "acts"], "--runs", "--threshold"),
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(COMMANDS), whole=NOT_WHOLE, number=NOT_A_NUMBER, which=st.booleans())
def test_a_flag_of_the_wrong_type_is_one_line_and_exit_2(tmp_path: Path, case, whole: str, number: str, which) -> None:
    app, args, whole_flag, number_flag = case
    out = tmp_path / "out"
    flag, value = (number_flag, number) if which and number_flag else (whole_flag, whole)
    output = ["--output_dir", str(out)] if app is train_app else ["--out", str(out)]
    line = refused(runner.invoke(app, [*args, *output, flag, value]), "Invalid value for", flag.lstrip("-")[:4])
    assert line.endswith("see --help")
    assert not out.exists()


def test_unknown_options_and_commands_are_one_line() -> None:
    refused(runner.invoke(analyze_app, ["ica", "--max-sweeps", "3"]), "No such option: --max-sweeps")
    refused(runner.invoke(analyze_app, ["evalu"]), "No such command 'evalu'")
    refused(runner.invoke(train_app, ["--output_dir", "o"]), "Missing option")
