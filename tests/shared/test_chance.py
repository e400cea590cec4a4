"""The chance level of multiple-choice data and the flag on an accuracy that cannot be told from it."""

from __future__ import annotations

import pytest
from scipy import stats

from shared.chance import at_chance, chance_level, chance_text


def test_chance_is_the_mean_of_one_over_each_records_choices() -> None:
    level = chance_level([2, 4, 4, 5], 0.5)
    assert level.chance == pytest.approx((1 / 2 + 1 / 4 + 1 / 4 + 1 / 5) / 4)
    assert level.records == 4


@pytest.mark.parametrize(
    ("accuracy", "flagged"),
    [(0.27, True), (0.25, True), (0.05, True), (0.36, False), (0.62, False)],
    ids=["near", "at", "below", "just-above", "well-above"],
)
def test_an_accuracy_whose_interval_reaches_chance_is_flagged(accuracy: float, flagged: bool) -> None:
    """100 four-way records: the Wilson interval of 27 right reaches 0.25, that of 36 right does not."""
    level = chance_level([4] * 100, accuracy)
    expected = stats.binomtest(round(accuracy * 100), 100).proportion_ci(method="wilson")
    assert (level.low, level.high) == pytest.approx((expected.low, expected.high))
    assert level.at_chance is flagged and at_chance(level.to_dict()) is flagged
    assert chance_text(level.to_dict()).endswith("at chance" if flagged else "above chance")


def test_no_multiple_choice_is_no_flag_and_a_record_without_choices_is_refused() -> None:
    assert at_chance(None) is False
    with pytest.raises(ValueError, match="at least one choice"):
        chance_level([4, 0], 0.5)
