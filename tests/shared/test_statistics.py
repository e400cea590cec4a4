"""shared/statistics.py: planted differences are found, null ones at the stated rate, intervals
cover the truth, corrections match the textbook, ratios against random sets are read only when
their denominator is clear of zero."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from shared.statistics import adjust, figure, paired_difference, ratio_interval

REPEATS = 1000  # binomial sd of a 0.05 rate: 0.007


def _scores(
    rng: np.random.Generator,
    n_seeds: int,
    n_rows: int,
    difference: float = 0.0,
    seed_sd: float = 0.03,
    row_sd: float = 0.15,
    noise_sd: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row answer losses (seeds, rows) of an arm and its control, and answer-token counts.

    Rows share a difficulty; each arm has its own seed effects, its own row effects (an arm is
    better on some rows under every seed) and scoring noise. The arm's token-weighted loss is
    higher than the control's by `difference` in expectation over seeds and rows.
    """
    weights = rng.integers(1, 20, n_rows).astype(float)
    difficulty = rng.gamma(2.0, 1.0, n_rows)

    def arm(shift: float) -> np.ndarray:
        seed_effect = rng.normal(0, seed_sd, (n_seeds, 1))
        row_effect = rng.normal(0, row_sd, n_rows)
        return shift + difficulty + seed_effect + row_effect + rng.normal(0, noise_sd, (n_seeds, n_rows))

    return arm(difference), arm(0.0), weights


def test_figure_is_the_token_weighted_mean() -> None:
    assert figure(np.array([1.0, 4.0]), np.array([3.0, 1.0])) == pytest.approx(7 / 4)
    assert figure(np.array([1.0, 0.0, 1.0, 1.0])) == pytest.approx(0.75)


@pytest.mark.parametrize("difference", [0.3, -0.3])
def test_a_planted_difference_is_found_with_its_sign_and_covered(difference: float) -> None:
    arm, control, weights = _scores(np.random.default_rng(7), n_seeds=3, n_rows=100, difference=difference)
    result = paired_difference(arm, control, weights)
    per_seed = [figure(a, weights) - figure(c, weights) for a, c in zip(arm, control, strict=True)]
    assert result.estimate == pytest.approx(np.mean(per_seed))
    assert np.sign(result.estimate) == np.sign(difference)
    assert result.p_value < 0.05
    assert result.low < difference < result.high
    assert result.note is None and "Satterthwaite" in result.method
    assert result.components.seed > 0 and result.components.row > 0 and result.components.residual > 0
    line = result.verdict("tune", "random-magnitude", "task loss", p_adjusted=result.p_value * 2, correction="Holm")
    word = "higher" if difference > 0 else "lower"
    assert line.startswith("tune vs random-magnitude, task loss: ")
    assert f"(Holm): tune {word} than random-magnitude by {abs(result.estimate):.3f} [" in line, line


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_null_differences_are_found_at_the_stated_rate_and_intervals_cover(n_seeds: int) -> None:
    rng = np.random.default_rng(n_seeds)
    found = covered = 0
    for _ in range(REPEATS):
        found += paired_difference(*_scores(rng, n_seeds, 100)).p_value < 0.05
        result = paired_difference(*_scores(rng, n_seeds, 100, difference=0.05))
        covered += result.low <= 0.05 <= result.high
    print(f"S={n_seeds}: false positives {found / REPEATS:.3f}, coverage {covered / REPEATS:.3f}")
    assert 0.03 <= found / REPEATS <= 0.075
    assert 0.93 <= covered / REPEATS <= 0.97


@pytest.mark.parametrize(("seed_sd", "row_sd", "fails"), [(0.01, 0.2, "seeds only"), (0.05, 0.03, "rows only")])
def test_seeds_alone_or_rows_alone_would_not_hold_their_level(seed_sd: float, row_sd: float, fails: str) -> None:
    """The crossed model is needed: a t-test over the seeds' figures counts the rows' effects as
    fixed, one over rows (seeds averaged) the seeds' effects; when that source dominates, it
    rejects a true null far too often, while the crossed model holds its level."""
    rng = np.random.default_rng(11)
    rejected = {"crossed": 0, "seeds only": 0, "rows only": 0}
    for _ in range(300):
        arm, control, weights = _scores(rng, 3, 100, seed_sd=seed_sd, row_sd=row_sd)
        rejected["crossed"] += paired_difference(arm, control, weights).p_value < 0.05
        per_seed = (arm - control) @ weights / weights.sum()
        rejected["seeds only"] += stats.ttest_1samp(per_seed, 0).pvalue < 0.05
        averaged = paired_difference(arm.mean(0, keepdims=True), control.mean(0, keepdims=True), weights)
        rejected["rows only"] += averaged.p_value < 0.05
    assert rejected["crossed"] / 300 < 0.08
    assert rejected[fails] / 300 > 0.2, rejected


def test_a_constant_difference_under_unequal_weights_has_no_uncertainty() -> None:
    """The linearization is centred: the spread of the token counts is not row-to-row noise."""
    control = np.random.default_rng(0).normal(2.0, 0.5, (3, 40))
    weights = np.arange(1.0, 41.0)
    result = paired_difference(control + 0.25, control, weights)
    assert result.estimate == pytest.approx(0.25)
    assert result.se == pytest.approx(0.0, abs=1e-12)
    identical = paired_difference(control, control, weights)
    assert identical.p_value == 1.0 and identical.low == identical.high == 0.0


def test_one_seed_falls_back_to_rows_and_says_so() -> None:
    arm, control, weights = _scores(np.random.default_rng(3), 1, 100, difference=0.3)
    result = paired_difference(arm, control, weights)
    assert result.n_seeds == 1 and result.df == 99
    assert "one seed" in result.note and "rows-only" in result.method
    assert math.isnan(result.components.seed)
    assert result.low < 0.3 < result.high
    assert result.verdict("tune", "random", "task loss").endswith(f"({result.note})")
    with pytest.raises(ValueError, match="one seed"):
        result.seeds_for(0.1)


def test_one_row_falls_back_to_seeds_and_says_so() -> None:
    arm, control, _ = _scores(np.random.default_rng(4), 6, 1)
    result = paired_difference(arm, control)
    assert result.n_rows == 1 and result.df == 5
    assert "one row" in result.note and "seeds-only" in result.method
    assert math.isnan(result.components.row)
    assert result.seeds_for(result.detectable() * (1 + 1e-9)) == 6


def test_bad_input_is_refused_in_one_line() -> None:
    good = np.zeros((3, 10))
    cases = [
        (lambda: paired_difference(good, np.zeros((3, 9))), "same seeds and rows"),
        (lambda: paired_difference(np.zeros((3, 0)), np.zeros((3, 0))), "non-empty"),
        (lambda: paired_difference(np.zeros(10), np.zeros(10)), "shape"),
        (lambda: paired_difference(np.zeros((1, 1)), np.zeros((1, 1))), "one seed and one row"),
        (lambda: paired_difference(good, good, weights=np.ones(9)), "one per row"),
        (lambda: paired_difference(good, good, weights=np.r_[0.0, np.ones(9)]), "positive"),
        (lambda: paired_difference(np.full((3, 10), np.nan), good), "NaN"),
        (lambda: paired_difference(good, good, confidence=95), "confidence"),
        (lambda: ratio_interval(np.zeros(10), np.zeros(9), np.zeros((4, 10))), "same rows"),
        (lambda: ratio_interval(np.zeros(10), np.zeros(10), np.zeros((4, 9))), "same rows"),
        (lambda: adjust([0.1, 1.5]), r"\[0, 1\]"),
        (lambda: adjust([0.1], method="bonferroni"), "holm, bh"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as raised:
            call()
        assert "\n" not in str(raised.value)


def test_detectable_shrinks_as_seeds_grow_and_seeds_for_inverts_it() -> None:
    rng = np.random.default_rng(5)
    fitted = [np.median([paired_difference(*_scores(rng, n, 100)).detectable() for _ in range(40)]) for n in (3, 5, 10)]
    assert fitted[0] > fitted[1] > fitted[2]
    result = paired_difference(*_scores(np.random.default_rng(6), 4, 100))
    predicted = [result.detectable(seeds=n) for n in range(2, 30)]
    assert all(a > b for a, b in zip(predicted, predicted[1:], strict=False))
    assert result.detectable(seeds=4) == result.detectable()
    assert result.seeds_for(result.detectable() * (1 + 1e-9)) == 4
    assert result.seeds_for(result.detectable(seeds=12) * (1 + 1e-9)) == 12
    assert result.seeds_for(10.0) == 2
    with pytest.raises(ValueError, match="power"):
        result.seeds_for(0.1, power=80)
    row_limit = math.sqrt(result.components.row / result.n_rows)
    assert result.seeds_for(row_limit) is None  # no number of seeds beats the rows' own noise


def test_seeds_for_gives_roughly_the_power_asked() -> None:
    """With the components well estimated (a pilot of 200 seeds), experiments with the seeds it
    asks for detect the difference about as often as asked (rounding up the seeds adds some)."""
    rng = np.random.default_rng(8)
    pilot = paired_difference(*_scores(rng, 200, 100, row_sd=0.05))
    target = 0.06
    n_seeds = pilot.seeds_for(target, power=0.8)
    assert n_seeds is not None and 3 < n_seeds < 20
    found = 0
    for _ in range(300):
        found += paired_difference(*_scores(rng, n_seeds, 100, difference=target, row_sd=0.05)).p_value < 0.05
    print(f"seeds_for({target}) = {n_seeds}: power {found / 300:.3f}")
    assert 0.7 <= found / 300 <= 0.95


def test_no_difference_shown_names_the_smallest_detectable() -> None:
    arm, control, weights = _scores(np.random.default_rng(9), 3, 100)
    result = paired_difference(arm, control, weights)
    assert result.p_value > 0.05
    line = result.verdict("tune", "random-magnitude", "task loss", p_adjusted=0.62, correction="Holm")
    assert "p=0.62 (Holm): no difference shown" in line
    assert line.endswith(f"3 seeds on these 100 rows could detect (80% power): {result.detectable():.3f}"), line


def test_small_differences_keep_their_digits() -> None:
    arm, control, weights = _scores(
        np.random.default_rng(10), 5, 100, difference=0.0004, seed_sd=1e-5, row_sd=1e-5, noise_sd=1e-4
    )
    line = paired_difference(arm, control, weights).verdict("tune", "random", "task loss")
    assert "tune higher than random by 0.000" in line and "0.00 [" not in line, line


def test_holm_and_bh_give_the_textbook_values() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted times 4/1, 4/2, 4/3, 4/4 = 0.02, 0.02, 0.04, 0.04 -> running min from the top
    assert adjust(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjust([0.5, 0.6], "holm") == [1.0, 1.0]
    assert adjust([], "bh") == []


def test_corrections_are_monotone_agree_with_scipy_and_pass_nan_through() -> None:
    p = np.random.default_rng(12).uniform(0, 0.2, 30)
    for method in ("holm", "bh"):
        corrected = np.array(adjust(p, method))
        order = np.argsort(p)
        assert np.all(np.diff(corrected[order]) >= 0) and np.all(corrected >= p) and np.all(corrected <= 1)
    if hasattr(stats, "false_discovery_control"):  # scipy >= 1.11
        assert adjust(p, "bh") == pytest.approx(stats.false_discovery_control(p).tolist())
    with_nan = adjust([0.01, math.nan, 0.04], "holm")
    assert with_nan[0] == pytest.approx(0.02) and math.isnan(with_nan[1]) and with_nan[2] == pytest.approx(0.04)


def _harms(rng: np.random.Generator, n_rows: int, n_draws: int, condition: float, control: float):
    base = rng.gamma(2.0, 1.0, n_rows)
    draw_effect = rng.normal(0, 0.02, (n_draws, 1))
    controls = base + control + draw_effect + rng.normal(0, 0.1, (n_draws, n_rows))
    return base + condition + rng.normal(0, 0.2, n_rows), base, controls


def test_a_planted_ratio_of_three_is_read_and_covered() -> None:
    rng = np.random.default_rng(13)
    condition, base, controls = _harms(rng, 400, 20, condition=0.3, control=0.1)
    ratio = ratio_interval(condition, base, controls, weights=rng.integers(1, 20, 400).astype(float))
    assert ratio.readable and ratio.note is None and "two-way" in ratio.method
    assert ratio.low < 3 < ratio.high and ratio.low > 1
    assert ratio.value == pytest.approx(ratio.numerator / ratio.denominator)
    assert ratio.rank == 0


def test_random_sets_with_no_extra_loss_give_no_ratio() -> None:
    condition, base, controls = _harms(np.random.default_rng(14), 400, 20, condition=0.3, control=0.0)
    ratio = ratio_interval(condition, base, controls)
    assert ratio.denominator_low < 0 < ratio.denominator_high
    assert not ratio.readable and ratio.value is None and ratio.low is None


def test_accuracy_lost_reads_in_the_right_direction() -> None:
    rng = np.random.default_rng(15)
    base = (rng.random(600) < 0.8).astype(float)
    controls = base * (rng.random((10, 600)) > 0.05)
    condition = base * (rng.random(600) > 0.15)
    ratio = ratio_interval(condition, base, controls, lower_is_better=False)
    assert ratio.readable and ratio.numerator > 0 and ratio.denominator > 0
    assert ratio.low > 1 and ratio.low < 3 < ratio.high


def test_rank_counts_the_random_sets_at_least_as_harmful() -> None:
    base = np.zeros(16)
    controls = np.arange(8)[:, None] / 8 + base  # harms 0, 1/8, ..., 7/8
    ratio = ratio_interval(np.full(16, 0.5), base, controls, draws=200)
    assert ratio.rank == 4  # 4/8, 5/8, 6/8, 7/8
    assert ratio_interval(np.full(16, 0.55), base, controls, draws=200).rank == 3
    assert ratio_interval(np.full(16, 2.0), base, controls, draws=200).rank == 0


def test_one_random_set_resamples_rows_only_and_says_so() -> None:
    condition, base, controls = _harms(np.random.default_rng(16), 300, 1, condition=0.3, control=0.1)
    ratio = ratio_interval(condition, base, controls, seed=3)
    assert ratio.n_draws == 1 and "one random set" in ratio.note and ratio.method.startswith("row bootstrap")
    assert ratio.readable and ratio.low < ratio.value < ratio.high
    assert ratio_interval(condition, base, controls, seed=3) == ratio  # seeded


def test_a_difference_without_spread_has_nothing_to_test() -> None:
    same = np.ones((3, 20))
    difference = paired_difference(same, same)
    assert not difference.spread and difference.estimate == 0 and difference.p_value == 1.0
    assert "no spread" in difference.verdict("arm", "control", "task acc")
    assert "could detect" not in difference.verdict("arm", "control", "task acc")
    assert paired_difference(same + 0.01 * np.arange(20), same).spread
