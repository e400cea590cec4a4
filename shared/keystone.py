"""The keystone regime: only the strongest neurons of the selected networks, ranked by |z| in their maps.

Tuning a very small share of a model's neurons, the ones that matter most, has matched full
fine-tuning while keeping other abilities better; `strongest` picks such a set from a mask file's
networks, and `--keystone` puts it wherever a network selection is used (fn-train's modes,
fn-analyze evaluate's conditions and their random controls).

How many: a `Keep`, either a count of neurons (an int >= 1) or a fraction of the selected networks'
union (a float in (0, 1]), as scikit-learn's `test_size` and `max_features` tell the two apart by
type. On the command line an integer (`50`) is a count; a number with a decimal point or an
exponent (`0.01`, `1.0`, `1e-3`) or a percentage (`1%`) is a fraction. `parse_keep` is the one
place that reads either.

This module imports nothing heavy (configs parse `--keystone` with it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shared.errors import ParameterError, UserError

if TYPE_CHECKING:
    from shared.masks import Network, NeuronSet

Keep = int | float  # int: a count of neurons; float: a fraction of the selected networks' union


def parse_keep(value: int | float | str, name: str = "keep") -> Keep:
    """`value` as a Keep: an int >= 1 (a count) or a float in (0, 1] (a fraction); text as the command
    line writes it (`50`, `0.01`, `1%`). A bad value is a ParameterError naming `name`."""
    rule = "a count of neurons such as 50, or a fraction of the networks' neurons such as 0.01 or 1%"
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed: Keep = int(text)
        except ValueError:
            try:
                parsed = float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise ParameterError("{" + name + "} must be " + rule + ", got {value!r}", value=value) from None
        value = parsed
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError("{" + name + "} must be " + rule + ", got {value!r}", value=value)
    if isinstance(value, int):
        if value < 1:
            raise ParameterError("{" + name + "} as a count must be at least 1, got {value}", value=value)
        return value
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ParameterError(
            "{" + name + "} as a fraction must lie in (0, 1], got {value:g}; a count is written as an integer "
            "(e.g. 50)",
            value=value,
        )
    return value


def keep_count(keep: Keep, size: int) -> int:
    """How many neurons `keep` means out of `size`: the count itself, or the fraction of `size` rounded
    half up, at least 1."""
    if isinstance(keep, int):
        return keep
    return max(1, math.floor(keep * size + 0.5))


def strongest(networks: Sequence[Network], keep: Keep, where: str = "the mask file") -> NeuronSet:
    """The `keep` neurons of the networks' union with the largest |z| (a neuron in several networks
    takes its largest), as layer -> sorted neurons; ties go to the lower (layer, neuron).

    `where` names the file in the error a network without z gets (the set-aside massive neurons, or
    a file written before z was recorded). For a mask file and ids:
    `strongest(select_networks(mask, ids), keep)`.
    """
    from shared.masks import MASSIVE  # imports numpy: not at the top, which configs import

    keep = parse_keep(keep)
    scores: dict[tuple[int, int], float] = {}
    for network in networks:
        if network.z is None:
            if network.id == MASSIVE:
                raise UserError(
                    "--keystone ranks neurons by their z in a network's map, and the set-aside massive neurons "
                    "are in no map; select networks by id with --networks, or drop --keystone"
                )
            raise UserError(
                f"{where} records no z per neuron (network {network.id}), which --keystone ranks by; "
                "re-run `fn-analyze ica` with this version to write them"
            )
        for layer, neurons in network.layers.items():
            for neuron, z in zip(neurons, network.z[layer], strict=True):
                scores[(layer, neuron)] = max(scores.get((layer, neuron), 0.0), abs(z))
    count = keep_count(keep, len(scores))
    if count > len(scores):
        ids = ",".join(str(network.id) for network in networks)
        raise UserError(
            f"--keystone {keep} asks for more neurons than network(s) {ids} hold ({len(scores)}); "
            f"give a count of at most {len(scores)}, or a fraction such as 0.01"
        )
    chosen: dict[int, list[int]] = {}
    for layer, neuron in sorted(scores, key=lambda pair: (-scores[pair], pair))[:count]:
        chosen.setdefault(layer, []).append(neuron)
    return {layer: tuple(sorted(neurons)) for layer, neurons in sorted(chosen.items())}
