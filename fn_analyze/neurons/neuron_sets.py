"""Sets of neurons (layer -> sorted indices) and the random control sets matched to them.

A control set has the same number of neurons as the set it matches in every stratum:
a stratum is a layer (size- and layer-matched, as Liu et al.'s random baseline) or a
layer and activation-magnitude bin (magnitude-matched: a network holding a
"massive activation" neuron is compared with random sets that hold one of the same size).
Draws are from all neurons of the stratum, the matched set's own included, so a
stratum the set fills entirely (a lone massive neuron) is drawn as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from shared.masks import MaskFile, NeuronSet, union

if TYPE_CHECKING:
    from fn_analyze.neurons.magnitude import NeuronMagnitude


def set_size(neurons: NeuronSet) -> int:
    return sum(len(ns) for ns in neurons.values())


def pairs(neurons: NeuronSet) -> set[tuple[int, int]]:
    return {(layer, n) for layer, ns in neurons.items() for n in ns}


def without(neurons: NeuronSet, excluded: set[tuple[int, int]]) -> NeuronSet:
    kept = {layer: tuple(n for n in ns if (layer, n) not in excluded) for layer, ns in neurons.items()}
    return {layer: ns for layer, ns in kept.items() if ns}


def draw_matched(neurons: NeuronSet, strata: np.ndarray, allowed: np.ndarray, rng: np.random.Generator) -> NeuronSet:
    """A random set with as many neurons as `neurons` in every (layer, stratum) cell.

    `strata` (layers x intermediate, int) labels each neuron's stratum within its layer
    (all zeros: layer-matched); `allowed` (same shape, bool) marks the neurons that may be drawn.
    """
    drawn: NeuronSet = {}
    for layer, ns in sorted(neurons.items()):
        labels = strata[layer]
        chosen: list[int] = []
        cells, counts = np.unique(labels[list(ns)], return_counts=True)
        for cell, count in zip(cells, counts, strict=True):
            pool = np.flatnonzero((labels == cell) & allowed[layer])
            chosen += rng.choice(pool, int(count), replace=False).tolist()
        drawn[layer] = tuple(sorted(chosen))
    return drawn


def control_pool(allowed: np.ndarray, set_aside: set[tuple[int, int]], neurons: NeuronSet) -> np.ndarray:
    """The neurons a condition's random sets may be drawn from: the allowed ones less the mask file's
    set-aside (massive) neurons that the condition does not hold itself. Its networks could not hold
    them, so a control that may draw them measures the massive neurons, not the networks."""
    if not set_aside:
        return allowed
    pool = allowed.copy()
    for layer, neuron in set_aside - pairs(neurons):
        pool[layer, neuron] = False
    return pool


def draw_control(
    mask: MaskFile,
    neurons: NeuronSet,
    matched_on: str,
    magnitude: NeuronMagnitude | None,
    bin_width: float,
    rng: np.random.Generator,
) -> NeuronSet:
    """The random control of `neurons` (networks of `mask`) that a training run uses: as many neurons per
    layer (`layer`) or per layer and magnitude bin (`magnitude`), drawn as `evaluate` draws its controls,
    without the mask file's set-aside neurons that `neurons` does not hold."""
    shape = (mask.model.n_layers, mask.model.intermediate_size)
    if matched_on == "magnitude":
        assert magnitude is not None, "magnitude-matched draws need the neurons' magnitudes"
        strata = magnitude.bins(bin_width)
    else:
        strata = np.zeros(shape, dtype=np.int64)
    set_aside = pairs(union([massive])) if (massive := mask.massive()) is not None else set()
    return draw_matched(neurons, strata, control_pool(np.ones(shape, dtype=bool), set_aside, neurons), rng)
