"""Claims with their uncertainty: differences between arms over seeds and rows, ratios against
random controls, and p-values corrected for the number of comparisons.

Every number here is a *figure*: a weighted mean over the scored rows,
``figure = sum(w_r * v_r) / sum(w_r)``. The answer loss is the per-row mean NLL weighted by the
row's answer-token count (a token-weighted mean); an accuracy is per-row 0/1 with weight 1.

Two sources of noise enter every comparison. Seeds: a fine-tuned arm or a random control is one
draw of many. Rows: the held-out rows are a sample of the task. When each row is scored under
every seed the two are *crossed*, and neither a t-test over seeds nor one over rows alone holds
its level (Clark 1973, "The language-as-fixed-effect fallacy"; Baayen, Davidson & Bates 2008).
`paired_difference` therefore fits crossed random intercepts for seed and row; `ratio_interval`
resamples rows and random draws independently (Owen 2007, "The pigeonhole bootstrap").

numpy and scipy only: the callers score rows with torch and hand over arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

SIGNIFICANT = 3  # digits the largest number of a printed interval keeps; the others share its decimals
CORRECTIONS = ("holm", "bh")
NO_SPREAD = "no spread: arm and control differ by the same amount on every row and seed, so there is nothing to test"
_ONE_SEED = "one seed: the seed-to-seed variance is unknown, so other numbers of seeds cannot be predicted"


def figure(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The weighted mean of per-row values (equal weights when `weights` is None)."""
    v = _values(values, "values", ndim=1)
    w = _weights(weights, v.size)
    return float(v @ w / w.sum())


@dataclass(frozen=True)
class Components:
    """Variance components of the linearized per-row difference (NaN where the design cannot
    estimate one): `seed` the variance of the seed intercept, `row` of the row intercept,
    `residual` the seed-by-row interaction and scoring noise together. ANOVA estimates
    truncated at zero."""

    seed: float
    row: float
    residual: float


@dataclass(frozen=True)
class Difference:
    """An arm minus its control, averaged over seeds, with its interval and p-value."""

    estimate: float
    low: float
    high: float
    p_value: float
    se: float
    df: float
    n_seeds: int
    n_rows: int
    confidence: float
    components: Components
    method: str
    note: str | None  # what the design could not estimate (one seed or one row), None otherwise

    def detectable(self, power: float = 0.8, alpha: float = 0.05, seeds: int | None = None) -> float:
        """The smallest true difference detected with probability `power` by a two-sided test at
        `alpha`: ``(t_{1-alpha/2, df} + t_{power, df}) * se`` (the usual normal-approximation power
        formula with t quantiles, e.g. Lenth 2001, "Some practical guidelines for effective sample
        size determination"). With `seeds`, for that many seeds on the same rows, predicted from
        the estimated components; by default for this design."""
        _check_probability(power, "power")
        _check_probability(alpha, "alpha")
        se, df = (self.se, self.df) if seeds is None else self._design(seeds)
        return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * se)

    @property
    def spread(self) -> bool:
        """Whether the difference varies over rows or seeds at all; without spread there is nothing to
        test it against, and no size it could detect."""
        return self.se > 0

    def seeds_for(self, difference: float, power: float = 0.8, alpha: float = 0.05) -> int | None:
        """The smallest number of seeds (at least 2, on the same rows) whose `detectable` is at
        most |difference|. None when no number of seeds is enough: the row component alone (the
        limit as seeds grow) keeps the standard error too large, and more rows are needed, not
        more seeds. Raises ValueError after one seed, whose seed component is unknown."""
        _check_probability(power, "power")
        _check_probability(alpha, "alpha")
        target = abs(float(difference))
        if not target > 0:
            raise ValueError(f"difference must be non-zero and finite, got {difference}")
        if self.n_seeds == 1:
            raise ValueError(_ONE_SEED)
        if self.n_rows > 1:
            df_limit = self.n_rows - 1
            floor = (stats.t.ppf(1 - alpha / 2, df_limit) + stats.t.ppf(power, df_limit)) * math.sqrt(
                self.components.row / self.n_rows
            )
            if floor >= target:
                return None
        low, high = 1, 2  # detectable(low) > target >= detectable(high); one seed is never predicted
        while self.detectable(power, alpha, seeds=high) > target:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            if self.detectable(power, alpha, seeds=middle) > target:
                low = middle
            else:
                high = middle
        return high

    def verdict(
        self,
        arm: str,
        control: str,
        measure: str,
        p_adjusted: float | None = None,
        correction: str | None = None,
        alpha: float = 0.05,
        power: float = 0.8,
    ) -> str:
        """One line: the difference, its interval and p-value, and what it shows, e.g.
        ``tune vs random-magnitude, task loss: -0.0140 [-0.0800, 0.0520], p=0.62 (Holm): no
        difference shown; the smallest difference 3 seeds on these 100 rows could detect (80%
        power): 0.110``. `p_adjusted` is this comparison's p-value from `adjust` and `correction`
        its label; both left out for a single comparison. After one seed or one row, the line
        ends with `note`."""
        p = self.p_value if p_adjusted is None else p_adjusted
        head = f"{arm} vs {control}, {measure}: {_interval(self.estimate, self.low, self.high)}, {p_text(p)}"
        if correction:
            head += f" ({correction})"
        if self.se == 0:  # every row of every seed differs by the same amount (often: none at all)
            line = f"{head}: {NO_SPREAD}"
        elif p < alpha:
            direction = "higher" if self.estimate > 0 else "lower"
            size = _interval(abs(self.estimate), *sorted((abs(self.low), abs(self.high))))
            line = f"{head}: {arm} {direction} than {control} by {size}"
        else:
            seeds = f"{self.n_seeds} seed" + ("s" if self.n_seeds > 1 else "")
            smallest = _number(self.detectable(power, alpha))
            line = (
                f"{head}: no difference shown; the smallest difference {seeds} on these {self.n_rows} rows "
                f"could detect ({power:.0%} power): {smallest}"
            )
        return line if self.note is None else f"{line} ({self.note})"

    def _design(self, seeds: int) -> tuple[float, float]:
        """(se, df) for `seeds` seeds on the same rows: this fit's own for its number of seeds,
        otherwise from the expected mean squares of the components."""
        if seeds == self.n_seeds:
            return self.se, self.df
        if seeds < 2:
            raise ValueError(f"seeds must be at least 2 to predict a design, got {seeds}")
        if self.n_seeds == 1:
            raise ValueError(_ONE_SEED)
        c = self.components
        if self.n_rows == 1:
            return math.sqrt(c.seed / seeds), seeds - 1
        variance, df = _mean_variance(
            c.residual + self.n_rows * c.seed, c.residual + seeds * c.row, c.residual, seeds, self.n_rows
        )
        return math.sqrt(variance), df


def paired_difference(
    arm: np.ndarray, control: np.ndarray, weights: np.ndarray | None = None, confidence: float = 0.95
) -> Difference:
    """Arm minus control, seed-paired, on rows scored under every seed.

    `arm` and `control` are per-row values of shape (seeds, rows); row r is the same row under
    every seed, and arm and control of one seed are paired (same seed, same data order).
    `weights` (rows,) are the rows' weights in the figure (answer tokens for the loss).

    The estimate is the mean over seeds of figure(arm_s) - figure(control_s). For the
    uncertainty, each cell is linearized to
    ``z_sr = D + w_r (a_sr - c_sr - D) / mean(w)`` (the influence function of a weighted mean,
    which keeps the spread of the weights themselves out of the row-to-row variation), whose
    mean over rows is seed s's figure difference exactly. The z's are fitted by a two-way
    random-effects model with crossed random intercepts for seed and row (balanced, one cell
    each) by ANOVA (Searle, Casella & McCulloch 1992, "Variance Components", ch. 4):
    ``Var(mean) = (MS_seed + MS_row - MS_resid) / (S R)``. MS_seed / (S R) and MS_row / (S R)
    are the variances seeds alone and rows alone would give, each an unbiased estimate of part
    of the true variance, so the variance is floored at the larger of them (with its degrees of
    freedom); otherwise the degrees of freedom are Satterthwaite's (1946, Biometrics Bulletin
    2:110-114). Interval and two-sided p-value from the t distribution.

    In simulation (tests/shared/test_statistics.py) three or more seeds hold the test's level; with
    two, the seed component has one degree of freedom and a true null is rejected somewhat more
    often than stated when seed noise dominates (about 0.11 at 0.05).

    With one seed the seed component cannot be estimated: rows only (the interval is then too
    narrow by the seed-to-seed variance), and `note` says so. With one row, seeds only.
    """
    _check_probability(confidence, "confidence")
    a = _values(arm, "arm", ndim=2)
    c = _values(control, "control", ndim=2)
    if a.shape != c.shape:
        raise ValueError(
            f"arm has shape {a.shape} and control {c.shape}: both must be (seeds, rows) of the same seeds and rows"
        )
    n_seeds, n_rows = a.shape
    if n_seeds * n_rows < 2:
        raise ValueError("one seed and one row: there is nothing to estimate the uncertainty from")
    w = _weights(weights, n_rows)
    x = a - c
    estimate = float(np.mean(x @ w) / w.sum())
    scale = w / w.mean()
    z = estimate + scale * (x - estimate)

    if n_seeds == 1 or n_rows == 1:
        flat = z.ravel()
        spread = float(flat.var(ddof=1))
        variance, df = spread / flat.size, flat.size - 1
        if n_seeds == 1:
            components = Components(seed=math.nan, row=spread, residual=math.nan)
            method = "rows-only t interval (one seed)"
            note = "one seed: the seed-to-seed variance cannot be estimated, so the interval holds the rows' noise only"
        else:
            components = Components(seed=spread, row=math.nan, residual=math.nan)
            method = "seeds-only t interval (one row)"
            note = "one row: the row-to-row variance cannot be estimated, so the interval holds the seeds' noise only"
    else:
        seed_means, row_means = z.mean(axis=1), z.mean(axis=0)
        ms_seed = n_rows * float(np.sum((seed_means - estimate) ** 2)) / (n_seeds - 1)
        ms_row = n_seeds * float(np.sum((row_means - estimate) ** 2)) / (n_rows - 1)
        interaction = z - seed_means[:, None] - row_means[None, :] + estimate
        ms_resid = float(np.sum(interaction**2)) / ((n_seeds - 1) * (n_rows - 1))
        variance, df = _mean_variance(ms_seed, ms_row, ms_resid, n_seeds, n_rows)
        components = Components(
            seed=max(0.0, (ms_seed - ms_resid) / n_rows),
            row=max(0.0, (ms_row - ms_resid) / n_seeds),
            residual=ms_resid,
        )
        method = "two-way random-effects (seed x row) t interval, Satterthwaite df"
        note = None

    se = math.sqrt(variance)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    if se > 0:
        p_value = float(2 * stats.t.sf(abs(estimate) / se, df))
    else:  # every cell the same difference: nothing varies, so the estimate is exact
        p_value = 1.0 if estimate == 0 else 0.0
    return Difference(
        estimate=estimate,
        low=estimate - half,
        high=estimate + half,
        p_value=p_value,
        se=se,
        df=float(df),
        n_seeds=n_seeds,
        n_rows=n_rows,
        confidence=confidence,
        components=components,
        method=method,
        note=note,
    )


def adjust(p_values: Sequence[float], method: str = "holm") -> list[float]:
    """p-values corrected for the number of comparisons, in the input's order.

    "holm": Holm-Bonferroni step-down (Holm 1979, Scand. J. Statist. 6:65-70), controlling the
    family-wise error rate; "bh": Benjamini-Hochberg (1995, J. R. Statist. Soc. B 57:289-300),
    controlling the false discovery rate. Both are made monotone in the ordered p-values and
    capped at 1. NaN (a comparison that could not be made) stays NaN and is not counted.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}: use one of {', '.join(CORRECTIONS)}")
    p = np.asarray(p_values, dtype=float).reshape(-1)
    present = ~np.isnan(p)
    if np.any((p[present] < 0) | (p[present] > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[present].min()} to {p[present].max()}")
    order = np.argsort(p[present])
    ordered = p[present][order]
    m = ordered.size
    rank = np.arange(1, m + 1)
    if method == "holm":
        corrected = np.maximum.accumulate((m - rank + 1) * ordered)
    else:
        corrected = np.minimum.accumulate((m * ordered / rank)[::-1])[::-1]
    result = np.full(p.size, np.nan)
    kept = np.flatnonzero(present)
    result[kept[order]] = np.minimum(corrected, 1.0)
    return result.tolist()


@dataclass(frozen=True)
class Ratio:
    """A condition's harm over the random sets' harm, both measured from the same base.

    Harm is the extra loss (figure - base's figure) or, for a figure where higher is better
    (accuracy), what is lost (base's figure - figure). `value`, `low` and `high` are None when
    the ratio is not readable: the interval of its denominator (the random sets' mean harm)
    holds zero, and a ratio over a number within noise of zero is no number to print.
    """

    value: float | None
    low: float | None
    high: float | None
    numerator: float  # the condition's harm
    denominator: float  # the random sets' mean harm
    denominator_low: float
    denominator_high: float
    readable: bool
    rank: int  # random sets whose harm is at least the condition's
    n_draws: int
    n_rows: int
    lower_is_better: bool
    confidence: float
    method: str
    note: str | None  # what the interval leaves out (with one random draw), None otherwise


def ratio_interval(
    condition: np.ndarray,
    base: np.ndarray,
    controls: np.ndarray,
    weights: np.ndarray | None = None,
    lower_is_better: bool = True,
    draws: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Ratio:
    """(fig(condition) - fig(base)) / mean_d (fig(control_d) - fig(base)), sign-flipped for a
    figure where higher is better, with a percentile bootstrap interval.

    `condition` and `base` are per-row values (rows,), `controls` those of each random set
    (n_draws, rows), all on the same rows. Each of `draws` resamples takes the rows with
    replacement and, independently, the random sets with replacement (a two-way "pigeonhole"
    bootstrap for the rows x draws crossing; Owen 2007, Ann. Appl. Statist. 1:386-411), and the
    interval is the resamples' percentiles (Efron & Tibshirani 1993, ch. 13). With one random
    set only the rows are resampled, and `note` says so.
    """
    _check_probability(confidence, "confidence")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    cond = _values(condition, "condition", ndim=1)
    base_values = _values(base, "base", ndim=1)
    ctrl = _values(controls, "controls", ndim=2)
    n_draws, n_rows = ctrl.shape
    if cond.shape != base_values.shape or base_values.size != n_rows:
        raise ValueError(
            f"condition {cond.shape}, base {base_values.shape} and controls {ctrl.shape}: "
            "must be (rows,), (rows,) and (draws, rows) on the same rows"
        )
    w = _weights(weights, n_rows)
    sign = 1.0 if lower_is_better else -1.0
    condition_harm = sign * (cond - base_values)  # harm is linear in the values, so row by row
    control_harm = sign * (ctrl - base_values)
    numerator = float(condition_harm @ w / w.sum())
    per_draw = control_harm @ w / w.sum()
    denominator = float(per_draw.mean())

    rng = np.random.default_rng(seed)
    numerators, denominators = np.empty(draws), np.empty(draws)
    block = max(1, (1 << 20) // n_rows)  # resamples per block, to bound the (block, rows) count matrix
    for start in range(0, draws, block):
        stop = min(draws, start + block)
        row_weights = rng.multinomial(n_rows, np.full(n_rows, 1 / n_rows), size=stop - start) * w
        total = row_weights.sum(axis=1)
        numerators[start:stop] = row_weights @ condition_harm / total
        harms = row_weights @ control_harm.T / total[:, None]
        if n_draws > 1:
            picks = rng.multinomial(n_draws, np.full(n_draws, 1 / n_draws), size=stop - start)
            denominators[start:stop] = np.sum(picks * harms, axis=1) / n_draws
        else:
            denominators[start:stop] = harms[:, 0]

    tails = [(1 - confidence) / 2, (1 + confidence) / 2]
    den_low, den_high = (float(q) for q in np.quantile(denominators, tails))
    readable = den_low > 0 or den_high < 0
    value: float | None = None
    low: float | None = None
    high: float | None = None
    if readable:
        with np.errstate(divide="ignore", invalid="ignore"):
            low, high = (float(q) for q in np.quantile(numerators / denominators, tails))
        value = numerator / denominator
    if n_draws > 1:
        method, note = f"two-way bootstrap (rows x random sets), percentile interval, {draws} resamples", None
    else:
        method = f"row bootstrap, percentile interval, {draws} resamples"
        note = "one random set: only rows are resampled, so the spread between random sets is not in the interval"
    return Ratio(
        value=value,
        low=low,
        high=high,
        numerator=numerator,
        denominator=denominator,
        denominator_low=den_low,
        denominator_high=den_high,
        readable=readable,
        rank=int(np.sum(per_draw >= numerator)),
        n_draws=n_draws,
        n_rows=n_rows,
        lower_is_better=lower_is_better,
        confidence=confidence,
        method=method,
        note=note,
    )


def _mean_variance(ms_seed: float, ms_row: float, ms_resid: float, n_seeds: int, n_rows: int) -> tuple[float, float]:
    """Variance of the grand mean of a balanced seeds x rows table with crossed random
    intercepts, and its degrees of freedom, from the three mean squares (see
    `paired_difference`)."""
    cells = n_seeds * n_rows
    combined = ms_seed + ms_row - ms_resid
    largest, largest_df = max((ms_seed, n_seeds - 1), (ms_row, n_rows - 1))
    if combined <= largest:  # a component's estimate is negative: the larger single one stands
        return largest / cells, largest_df
    terms = ((ms_seed, n_seeds - 1), (ms_row, n_rows - 1), (ms_resid, (n_seeds - 1) * (n_rows - 1)))
    return combined / cells, combined**2 / sum(ms**2 / df for ms, df in terms)


def _values(values: np.ndarray, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    shape = "(rows,)" if ndim == 1 else "(n, rows)"
    if array.ndim != ndim or array.size == 0:
        raise ValueError(f"{name} must be a non-empty array of shape {shape}, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def _weights(weights: np.ndarray | None, n_rows: int) -> np.ndarray:
    if weights is None:
        return np.ones(n_rows)
    w = np.asarray(weights, dtype=float)
    if w.shape != (n_rows,):
        raise ValueError(f"weights must have shape ({n_rows},), one per row, got {w.shape}")
    if not np.all(np.isfinite(w) & (w > 0)):
        raise ValueError("weights must be positive and finite (drop rows that have nothing to score)")
    return w


def _check_probability(value: float, name: str) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")


def _decimals(*values: float) -> int:
    """Decimals that give the largest of `values` SIGNIFICANT digits."""
    largest = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    if largest == 0:
        return SIGNIFICANT
    return max(0, SIGNIFICANT - 1 - math.floor(math.log10(largest)))


def _number(value: float) -> str:
    return f"{value:.{_decimals(value)}f}"


def _interval(value: float, low: float, high: float) -> str:
    d = _decimals(value, low, high)
    return f"{value:.{d}f} [{low:.{d}f}, {high:.{d}f}]"


def p_text(p: float) -> str:
    """A p-value as the verdict lines print it: two significant digits, `p<0.0001` below that."""
    return "p<0.0001" if p < 1e-4 else f"p={p:.2g}"
