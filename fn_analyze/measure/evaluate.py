"""`fn-analyze evaluate`: what switching a mask file's networks off (or keeping only them) does.

On held-out data, answer-token loss (multiple-choice data: also acc and acc_norm; optionally
exact match and answer containment of greedy generations) at baseline and with:
the union of the selected networks switched off (mode key), only the union kept (mode
complement), and each network switched off on its own (with --keystone, each of these sets is only
its strongest neurons by |z|, `shared.keystone`). Each of these is compared with
random neuron sets of the same size, drawn two ways (see `neuron_sets`):

- layer-matched: the same number of neurons in every layer (Liu et al.'s random control);
- magnitude-matched: the same number in every layer and log-magnitude bin, so a network
  whose effect comes from a few "massive activation" neurons is not mistaken for a function.

The ratio reported is the network's extra loss over the control's mean extra loss
((loss - baseline) / (control - baseline)): above 1 the network matters more than random
neurons of its size; for `complement`, below 1 keeping the network is better than keeping
random neurons. Each ratio carries an interval that resamples the scored rows and, independently,
the random sets (`shared.statistics.ratio_interval`), and the condition's rank among the sets; a
ratio whose denominator is within noise of zero has no value (not readable).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fn_analyze.config import EvaluateConfig
from fn_analyze.measure.scoring import (
    Batch,
    ChoiceSet,
    EvalSet,
    Score,
    chance_record,
    load_eval_set,
    make_batches,
    score,
)
from fn_analyze.neurons.magnitude import NeuronMagnitude, Statistic, stats_from_activations, stats_from_forward
from fn_analyze.neurons.neuron_sets import control_pool, draw_matched, pairs, set_size, without
from shared import __version__
from shared.ablation import Ablation, NeuronMeans
from shared.arch import DownProjection, find_down_projections
from shared.constants import EVALUATION_SCHEMA_VERSION
from shared.device import choose_device, choose_dtype
from shared.digests import file_digest
from shared.errors import UserError
from shared.hooks import stacked_down_projections
from shared.jsonio import write_json_atomic
from shared.keystone import strongest
from shared.layer_masks import build_layer_masks
from shared.masks import (
    MASSIVE,
    MaskFile,
    MaskMode,
    Network,
    NetworkId,
    NeuronSet,
    check_compatible,
    load_mask_file,
    parse_network_ids,
    select_networks,
    union,
)
from shared.models import load_causal_lm, load_tokenizer, model_info
from shared.paths import check_writable_file
from shared.progress import progress_bar
from shared.statistics import paired_difference, ratio_interval

log = logging.getLogger(__name__)

CONTROLS: tuple[str, ...] = ("layer_matched", "magnitude_matched")


@dataclass(frozen=True)
class Condition:
    name: str
    kind: str  # "union" (all selected networks together) or "network" (one on its own)
    mode: MaskMode
    networks: tuple[NetworkId, ...]
    neurons: NeuronSet  # after leaving out the top-magnitude neurons when asked
    top_held: int  # how many of the top_n largest-magnitude neurons the networks hold
    draws: int
    stream: int  # seeds the condition's random draws independently of the other conditions


class Evaluator:
    """A model, its down-projections and the data: measures a score with any neuron set masked."""

    def __init__(
        self,
        model,
        tokenizer,
        projections: list[DownProjection],
        mask: MaskFile,
        batches: list[Batch],
        exact_match: bool,
        max_new_tokens: int,
        ablation: Ablation | None = None,
        choices: tuple[ChoiceSet, list[Batch]] | None = None,
        per_pass: int = 1,
    ) -> None:
        self.model, self.tokenizer, self.projections, self.mask = model, tokenizer, projections, mask
        self.batches, self.exact_match, self.max_new_tokens = batches, exact_match, max_new_tokens
        self.ablation, self.choices, self.per_pass = ablation or Ablation(), choices, per_pass

    def _score(self, copies: int) -> list[Score]:
        return score(
            self.model, self.tokenizer, self.batches, self.exact_match, self.max_new_tokens, self.choices, copies
        )

    def baseline(self) -> Score:
        return self._score(1)[0]

    def masked(
        self, sets: Sequence[tuple[NeuronSet, MaskMode]], progress: Any = None
    ) -> list[tuple[Score, tuple[int, ...]]]:
        """For each (neurons, mode): the score with `neurons` intervened on (key) or alone left as they
        are (complement), and the layers where every neuron is intervened on. `per_pass` sets share
        a forward pass, each on its own copy of the rows; `progress` advances by one per set."""
        results: list[tuple[Score, tuple[int, ...]]] = []
        for start in range(0, len(sets), self.per_pass):
            chunk = sets[start : start + self.per_pass]
            masks = [
                self.ablation.apply(build_layer_masks(self.mask, [Network(-1, neurons)], mode))
                for neurons, mode in chunk
            ]
            with stacked_down_projections(self.projections, masks):
                scores = self._score(len(chunk))
            results += [(scored, masks.fully_closed_layers) for scored, masks in zip(scores, masks, strict=True)]
            if progress is not None:
                progress.update(len(chunk))
        return results


def _condition_neurons(
    selected: list[Network], config: EvaluateConfig, where: str
) -> dict[tuple[NetworkId, ...], NeuronSet]:
    """The neurons of the union of the selected networks and (when measured) of each on its own, by their
    ids: all of them, or with --keystone the strongest of each by |z|."""

    def neurons(networks: list[Network]) -> NeuronSet:
        return union(networks) if config.keystone is None else strongest(networks, config.keystone, where)

    sets = {tuple(network.id for network in selected): neurons(selected)}
    if len(selected) > 1 and config.per_network:
        sets.update({(network.id,): neurons([network]) for network in selected})
    return sets


def _conditions(
    mask: MaskFile,
    selected: list[Network],
    neurons_of: dict[tuple[NetworkId, ...], NeuronSet],
    top: set[tuple[int, int]],
    config: EvaluateConfig,
) -> list[Condition]:
    excluded = top if config.exclude_top else set()
    ids = tuple(network.id for network in selected)
    everything = neurons_of[ids]
    name = f"union of {len(selected)} networks" if len(selected) > 1 else f"network {selected[0].id}"
    held = len(pairs(everything) & top)
    conditions = [
        Condition(name, "union", "key", ids, without(everything, excluded), held, config.draws, 0),
        Condition(name, "union", "complement", ids, without(everything, excluded), held, config.draws, 1),
    ]
    if len(selected) > 1 and config.per_network:
        for network in selected:
            neurons = neurons_of[(network.id,)]
            conditions.append(
                Condition(
                    f"network {network.id}",
                    "network",
                    "key",
                    (network.id,),
                    without(neurons, excluded),
                    len(pairs(neurons) & top),
                    config.network_draws,
                    2 + [*mask.network_ids(), MASSIVE].index(network.id),
                )
            )
    return conditions


ACCURACY_FIELDS: tuple[str, ...] = ("exact_match", "contains", "accuracy", "accuracy_norm")


def summarize_control(
    scores: list[Score], overlaps: list[float], result: Score, base: Score, seed: int
) -> dict[str, Any]:
    """One control of a condition: its draws' losses and accuracies, and the condition's ratios over
    them (loss, and the headline accuracy where there is one) with their intervals; `seed` seeds the
    intervals' resampling."""
    losses = [s.loss for s in scores]
    summary: dict[str, Any] = {
        "draws": len(losses),
        "losses": losses,
        "mean": float(np.mean(losses)),
        "std": float(np.std(losses)),
        "ratio": ratio_of("loss", result, base, scores, seed),
        "detectable": detectable_harm(base, scores),
        "overlap": float(np.mean(overlaps)),  # share of the drawn neurons that are the condition's own
    }
    summary.update(_accuracy_means(scores))
    headline = base.headline_accuracy_name
    if headline is not None:
        summary["accuracy_std"] = float(np.std([s.headline_accuracy for s in scores]))
        summary["accuracy_ratio"] = ratio_of(headline, result, base, scores, seed)
    return summary


def ratio_of(figure: str, result: Score, base: Score, controls: list[Score], seed: int) -> dict[str, Any]:
    """The condition's harm on `figure` (extra loss; for an accuracy, accuracy lost) over the random
    sets' mean harm, with its interval resampling the rows and the random sets
    (`shared.statistics.ratio_interval`); its value is None where that mean harm is within noise of zero."""
    values, weights = row_figure(result, figure)
    ratio = ratio_interval(
        values,
        row_figure(base, figure)[0],
        np.stack([row_figure(control, figure)[0] for control in controls]),
        weights,
        lower_is_better=figure == "loss",
        seed=seed,
    )
    return asdict(ratio)


DETECTION_POWER = 0.8  # of `detectable_harm`, with a two-sided test at 5%


def detectable_harm(base: Score, controls: list[Score]) -> dict[str, float] | None:
    """The smallest extra loss of the random sets' mean over the base that these rows could detect
    (`extra_loss`, at `power`; `shared.statistics.Difference.detectable`, paired over the rows); None
    when the rows do not vary or are fewer than two. A ratio whose random sets harm less than this
    has a denominator these rows cannot tell from zero."""
    base_values, weights = row_figure(base, "loss")
    if len(base_values) < 2:
        return None
    mean_control = np.mean(np.stack([row_figure(control, "loss")[0] for control in controls]), axis=0)
    difference = paired_difference(mean_control[None, :], base_values[None, :], weights)
    if not difference.spread:
        return None
    return {"extra_loss": difference.detectable(DETECTION_POWER), "power": DETECTION_POWER}


def row_figure(scored: Score, figure: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(each row's value, each row's weight or None) of `figure`, as arrays for `shared.statistics`."""
    assert scored.rows is not None  # every score of an evaluation keeps its rows
    found = scored.rows.figure(figure)
    assert found is not None
    values, weights = found
    return np.asarray(values, dtype=float), None if weights is None else np.asarray(weights, dtype=float)


def _accuracy_means(scores: list[Score]) -> dict[str, float]:
    return {
        name: float(np.mean([getattr(s, name) for s in scores]))
        for name in ACCURACY_FIELDS
        if getattr(scores[0], name) is not None
    }


def _held_out(mask: MaskFile, dataset: str) -> bool | None:
    """False when the evaluation file is the one the networks were found on; None when unknown."""
    found_on = mask.source.get("activations", {}).get("dataset", {}).get("digest")
    if found_on is None or not Path(dataset).is_file():
        return None
    return file_digest(Path(dataset)) != found_on


@dataclass(frozen=True)
class EvaluationPlan:
    """What an evaluation measures, read before any model loads: the mask file and the networks
    selected, the eval data, and (from --activations) the neurons' magnitudes and means."""

    config: EvaluateConfig
    mask: MaskFile
    selected: list[Network]
    neurons: dict[tuple[NetworkId, ...], NeuronSet]  # the union's and each measured network's (`_condition_neurons`)
    tokenizer: Any  # padding on the right
    eval_set: EvalSet
    with_exact_match: bool
    magnitude: NeuronMagnitude | None  # None: measured by a pass over the eval data once the model is loaded
    means: NeuronMeans | None


def plan_evaluation(config: EvaluateConfig, tokenizer: Any = None) -> EvaluationPlan:
    """Read the mask file, the magnitudes of --activations and the eval data (tokenized with
    `tokenizer`, default the model's own, loaded here; its padding side is set to the right)."""
    mask = load_mask_file(config.mask_file)
    selected = select_networks(mask, parse_network_ids(config.networks))
    neurons = _condition_neurons(selected, config, f"mask file {config.mask_file}")
    magnitude, means = None, None
    if config.activations is not None:  # read before the model loads, so unfit activations fail fast
        magnitude, means = _stats_from_activations(config, config.activations, mask, selected)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model)
    tokenizer.padding_side = "right"
    eval_set = load_eval_set(
        config.dataset,
        tokenizer,
        config.split,
        config.data_format,
        config.template_format,
        config.limit,
        config.max_length,
    )
    if config.exact_match and not eval_set.has_answers:
        log.warning(
            "exact match needs answers; dataset %s has plain text, so only the loss is measured", config.dataset
        )
    with_exact_match = config.exact_match and eval_set.has_answers
    return EvaluationPlan(config, mask, selected, neurons, tokenizer, eval_set, with_exact_match, magnitude, means)


def _stats_from_activations(
    config: EvaluateConfig, folder: Path, mask: MaskFile, selected: list[Network]
) -> tuple[NeuronMagnitude, NeuronMeans | None]:
    """The neurons' magnitudes (and, for --ablation mean, means) from an activations folder that
    holds every layer they are needed for."""
    stats = stats_from_activations(folder, mask.model, _wanted(config), cache=True)
    magnitude = stats.magnitude()
    missing = sorted(set(union(selected)) - set(magnitude.measured_layers()))
    if missing:
        raise UserError(
            f"activations {folder} lack layer {missing[0]}, where the selected networks have "
            "neurons; give activations of every layer, or leave out --activations to measure magnitudes "
            "on the eval data"
        )
    unmeasured = sorted(set(range(mask.model.n_layers)) - set(magnitude.measured_layers()))
    if config.ablation == "mean" and unmeasured:
        raise UserError(
            f"activations {folder} lack layer {unmeasured[0]}, but --ablation mean needs every "
            "layer's means (keeping only the networks sets every other neuron to its mean); give activations "
            "of every layer, or leave out --activations to measure the means on the eval data"
        )
    return magnitude, stats.means() if config.ablation == "mean" else None


def _wanted(config: EvaluateConfig) -> list[Statistic]:
    """The neurons' statistics an evaluation uses: magnitudes, and the means for --ablation mean."""
    return ["max_abs", "mean"] if config.ablation == "mean" else ["max_abs"]


@dataclass(frozen=True)
class Measurements:
    """What an evaluation measured: the baseline, a row per condition (its score and its
    controls'), the random-fraction control, and the magnitudes and ablation it used."""

    base: Score
    rows: list[dict[str, Any]]
    random_fraction: dict[str, Any] | None
    skipped: list[Condition]  # conditions left without a neuron by --exclude-top
    magnitude: NeuronMagnitude
    top: set[tuple[int, int]]  # the top_n largest-magnitude neurons
    ablation: Ablation


def measure_conditions(plan: EvaluationPlan, model: nn.Module | None = None) -> Measurements:
    """Score the baseline, every condition and its random controls with `model` (default: the
    model the config names, loaded here), which must be the mask file's model."""
    config, mask, eval_set = plan.config, plan.mask, plan.eval_set
    if model is None:
        device = choose_device(config.device)
        model = load_causal_lm(config.model, choose_dtype(config.dtype, device.type), device)
    projections = find_down_projections(model)
    check_compatible(mask, model_info(model, config.model, projections))
    pad_id = plan.tokenizer.pad_token_id
    batches = make_batches(eval_set, config.batch_size, pad_id)
    magnitude, means = plan.magnitude, plan.means
    if magnitude is None:
        stats = stats_from_forward(
            model.base_model, projections, batches, f"a pass over {config.dataset}", _wanted(config)
        )
        magnitude, means = stats.magnitude(), stats.means() if config.ablation == "mean" else None
    ablation = Ablation(config.ablation, config.scale_factor, means if config.ablation == "mean" else None)
    choices = None
    if eval_set.choices is not None:
        choices = (eval_set.choices, make_batches(eval_set.choices, config.batch_size, pad_id))
    evaluator = Evaluator(
        model,
        plan.tokenizer,
        projections,
        mask,
        batches,
        plan.with_exact_match,
        config.max_new_tokens,
        ablation,
        choices,
        config.conditions_per_pass,
    )
    top = magnitude.top(config.top_n)
    conditions = _conditions(mask, plan.selected, plan.neurons, top, config)
    skipped = [c for c in conditions if not c.neurons]
    measured = [c for c in conditions if c.neurons]
    base, rows, random_fraction = _score_conditions(evaluator, measured, magnitude, top, config)
    return Measurements(base, rows, random_fraction, skipped, magnitude, top, ablation)


def _score_conditions(
    evaluator: Evaluator,
    conditions: list[Condition],
    magnitude: NeuronMagnitude,
    top: set[tuple[int, int]],
    config: EvaluateConfig,
) -> tuple[Score, list[dict[str, Any]], dict[str, Any] | None]:
    """(baseline, a row per condition, the random-fraction control or None)."""
    allowed = np.ones(magnitude.max_abs.shape, dtype=bool)
    if config.exclude_top:
        for layer, neuron in top:
            allowed[layer, neuron] = False
    set_aside = pairs(union([massive])) if (massive := evaluator.mask.massive()) is not None else set()
    strata = {
        "layer_matched": np.zeros(magnitude.max_abs.shape, dtype=np.int64),
        "magnitude_matched": magnitude.bins(config.bin_width),
    }
    total = 1 + sum(1 + len(CONTROLS) * c.draws for c in conditions)
    total += config.draws if config.random_fraction is not None else 0
    with progress_bar(total=total, unit="mask", desc="evaluate") as progress:
        base = evaluator.baseline()
        progress.update()
        # Every condition's neuron sets (its own, then each control's draws) first, so that the
        # forward passes can score several of them at once.
        draws = [
            {
                control: [
                    draw_matched(
                        condition.neurons,
                        strata[control],
                        control_pool(allowed, set_aside, condition.neurons),
                        np.random.default_rng([config.seed, condition.stream, index, draw]),
                    )
                    for draw in range(condition.draws)
                ]
                for index, control in enumerate(CONTROLS)
            }
            for condition in conditions
        ]
        sets = [
            (neurons, condition.mode)
            for condition, drawn in zip(conditions, draws, strict=True)
            for neurons in [condition.neurons, *(d for control in CONTROLS for d in drawn[control])]
        ]
        scored = iter(evaluator.masked(sets, progress))
        rows = [
            _row(condition, drawn, scored, base, config.seed)
            for condition, drawn in zip(conditions, draws, strict=True)
        ]
        random_fraction = None
        if config.random_fraction is not None:
            random_fraction = _random_fraction(evaluator, config, allowed, magnitude.measured_layers(), progress)
    return base, rows, random_fraction


def assemble_results(plan: EvaluationPlan, measured: Measurements, seconds: float) -> dict[str, Any]:
    """The results JSON: every figure of the table (see `fn_analyze.report.eval_table`) and what it was measured on."""
    config, magnitude, ablation = plan.config, measured.magnitude, measured.ablation
    return {
        "schema_version": EVALUATION_SCHEMA_VERSION,
        "created_by": f"functional-networks {__version__}",
        "model": config.model,
        "mask_file": str(config.mask_file),
        "mask_digest": file_digest(config.mask_file),
        "dataset": _dataset_dict(plan.eval_set, _held_out(plan.mask, config.dataset)),
        "magnitude": {
            "statistic": "max |activation| over tokens",
            "source": magnitude.source,
            "top_n": config.top_n,
            "top_largest": float(np.nanmax(magnitude.max_abs)),
            "top_smallest": float(min(magnitude.max_abs[layer, n] for layer, n in measured.top)),
            "excluded": config.exclude_top,
            # the mask file's set-aside neurons, left out of the random sets of the conditions that do not hold them
            "set_aside_left_out": massive.size if (massive := plan.mask.massive()) is not None else 0,
            "bin_width_decades": config.bin_width,
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "ablation": {
            "mode": ablation.mode,
            "scale_factor": ablation.scale_factor,
            "means_source": ablation.means.source if ablation.means is not None else None,
        },
        "accuracy_metric": _accuracy_metric(measured.base),
        "baseline": score_dict(measured.base),
        "chance": chance_record(plan.eval_set, measured.base),
        "conditions": measured.rows,
        "random_fraction": measured.random_fraction,
        "skipped": [
            {"name": c.name, "mode": c.mode, "reason": f"all its neurons are among the {config.top_n} left out"}
            for c in measured.skipped
        ],
        "seconds": seconds,
    }


def write_results(config: EvaluateConfig, results: dict[str, Any]) -> None:
    """The results JSON at `config.out` and its plot beside it."""
    write_json_atomic(config.out, results)
    from fn_analyze.report.plots import plot_evaluation  # matplotlib is imported only when a plot is drawn

    plot_evaluation(results, config.plot_path)


def evaluate(config: EvaluateConfig, model: nn.Module | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Measure every condition and its controls; write the results JSON and the plot; return the results.

    The stages, public for notebooks and benchmarks: `plan_evaluation` (mask, magnitudes, data),
    `measure_conditions` (the model's scores), `assemble_results`, `write_results`. A `model` and
    `tokenizer` given are used instead of loading the ones `config.model` names.
    """
    check_writable_file(config.out, "--out", config.overwrite)
    started = time.perf_counter()
    plan = plan_evaluation(config, tokenizer)
    measured = measure_conditions(plan, model)
    results = assemble_results(plan, measured, seconds=round(time.perf_counter() - started, 1))
    write_results(config, results)
    return results


def _row(
    condition: Condition, drawn: dict[str, list[NeuronSet]], scored: Iterator, base: Score, seed: int
) -> dict[str, Any]:
    """One condition's row of the results: its score, then each control's draws' (taken from
    `scored` in the order the sets were listed) with the condition's ratios over them."""
    result, closed = next(scored)
    own = pairs(condition.neurons)
    controls = {}
    for control in CONTROLS:
        scores = [next(scored)[0] for _ in drawn[control]]
        overlaps = [len(pairs(neurons) & own) / len(own) for neurons in drawn[control]]
        if scores:
            controls[control] = summarize_control(scores, overlaps, result, base, seed)
    return {
        "name": condition.name,
        "kind": condition.kind,
        "mode": condition.mode,
        "networks": list(condition.networks),
        "neurons": set_size(condition.neurons),
        "layers": len(condition.neurons),
        "top_magnitude_held": condition.top_held,
        "closed_layers": list(closed),
        **score_dict(result),
        "controls": controls,
    }


def _random_fraction(
    evaluator: Evaluator, config: EvaluateConfig, allowed: np.ndarray, layers: list[int], progress
) -> dict[str, Any]:
    """Liu et al.'s control: `random_fraction` of all (measured, allowed) neurons, drawn uniformly, off."""
    assert config.random_fraction is not None
    pool = np.zeros_like(allowed)
    pool[layers] = allowed[layers]
    candidates = np.flatnonzero(pool)
    count = max(1, round(config.random_fraction * len(candidates)))
    width = allowed.shape[1]
    sets: list[tuple[NeuronSet, MaskMode]] = []
    for draw in range(config.draws):
        rng = np.random.default_rng([config.seed, 1_000_003, draw])  # a stream no condition uses
        chosen = np.sort(rng.choice(candidates, size=count, replace=False))
        neurons: NeuronSet = {}
        for flat in chosen.tolist():
            neurons.setdefault(flat // width, ())
            neurons[flat // width] += (flat % width,)
        sets.append((neurons, "key"))
    scores = [scored for scored, _ in evaluator.masked(sets, progress)]
    losses = [s.loss for s in scores]
    summary: dict[str, Any] = {
        "fraction": config.random_fraction,
        "neurons": count,
        "mode": "key",
        "draws": len(scores),
        "losses": losses,
        "mean": float(np.mean(losses)),
        "std": float(np.std(losses)),
    }
    summary.update(_accuracy_means(scores))
    headline = [s.headline_accuracy for s in scores]
    if headline[0] is not None:
        summary["accuracy_std"] = float(np.std(headline))
    return summary


def _accuracy_metric(base: Score) -> str | None:
    """Which accuracy the accuracy ratios are of: acc (multiple choice), contains (generation), or none."""
    if base.accuracy is not None:
        return "accuracy"
    return "contains" if base.contains is not None else None


def score_dict(result: Score) -> dict[str, Any]:
    """The loss, perplexity and whichever accuracies `result` has, as the results JSON holds them."""
    scored: dict[str, Any] = {"loss": result.loss, "perplexity": result.perplexity}
    for name in ACCURACY_FIELDS:
        if getattr(result, name) is not None:
            scored[name] = getattr(result, name)
    return scored


def _dataset_dict(eval_set: EvalSet, held_out: bool | None) -> dict[str, Any]:
    return {
        "source": eval_set.source,
        "split": eval_set.split,
        "format": eval_set.data_format,
        "template": eval_set.template,
        "rows": len(eval_set.rows),
        "answer_tokens": eval_set.n_answer_tokens,
        "choice_records": eval_set.choices.n_records if eval_set.choices is not None else 0,
        "held_out": held_out,
    }
