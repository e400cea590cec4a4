"""evaluate says when its rows are too few for its ratios to mean anything: the smallest extra loss the
rows could detect (shared.statistics) against the random sets' harm, and a floor of rows; and its
header names a split only where the data has splits."""

from __future__ import annotations

from pathlib import Path

from fn_analyze.measure.evaluate import summarize_control
from fn_analyze.report.eval_table import MIN_ROWS, format_table
from tests.fn_analyze.measure.test_evaluate import _condition, _planted, _results


def _table(rows: int, control_harms: list[float], noise: float, source: str = "rows") -> str:
    base, result, sets = _planted(0.5, control_harms, noise=noise, rows=rows)
    control = summarize_control(sets, [0.0] * len(sets), result, base, seed=0)
    union = {**_condition("union of 3 networks", "key", result, {"magnitude_matched": control}), "kind": "union"}
    results = _results([union])
    results["dataset"].update(rows=rows, source=source)
    return format_table(results)


def test_three_rows_are_flagged_as_too_few_even_with_a_clear_ratio() -> None:
    table = _table(3, [0.03, 0.035, 0.04, 0.03, 0.035], noise=0.001)
    assert "x [" in table  # a ratio is printed, as it was on three rows...
    assert "warning: 3 rows are too few for these ratios to mean anything" in table  # ...and called what it is
    assert "a bootstrap over so few rows has few distinct resamples" in table and 3 < MIN_ROWS


def test_enough_rows_with_a_clear_random_harm_print_what_they_detect_and_no_warning() -> None:
    table = _table(60, [0.1, 0.12, 0.09, 0.11, 0.1], noise=0.01)
    (line,) = [line for line in table.splitlines() if line.startswith("rows: ")]
    detectable = float(line.split("could detect (80% power) is ")[1].split(";")[0])
    assert 0 < detectable < 0.1  # the random sets' 0.1 is well above it
    assert "too few" not in table


def test_random_harm_below_what_the_rows_detect_is_flagged() -> None:
    table = _table(60, [0.01, 0.012, 0.009, 0.011, 0.01], noise=0.2)
    assert "warning: 60 rows are too few for these ratios to mean anything (the random sets' harm" in table


def test_the_header_names_a_split_only_for_data_with_splits(tmp_path: Path) -> None:
    data = tmp_path / "eval.csv"
    data.write_text("question,answer\nq,a\n")
    assert f"on {data} (60 rows, " in _table(60, [0.1] * 5, noise=0.01, source=str(data))
    assert "on org/name (test split, 60 rows, " in _table(60, [0.1] * 5, noise=0.01, source="org/name")
