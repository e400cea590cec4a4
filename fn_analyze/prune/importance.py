"""How much each MLP neuron matters to its block's output, for pruning.

A neuron j of a layer adds a_j * w_j to the block's output (a_j: its down-projection input,
w_j: its down-projection column). Removing it changes the output by

- a_j * w_j when it is simply cut (`--no-compensate`): expected squared size E[a_j^2] |w_j|^2;
- (a_j - mean_j) * w_j when its mean contribution mean_j * w_j moves into the bias (compensated):
  expected squared size Var(a_j) |w_j|^2, FLAP's fluctuation metric (An et al., AAAI 2024).

The importance of a neuron is that expected squared change, each neuron taken on its own; pruning
keeps the largest. Both need the first two moments of every neuron's activation over real tokens
(`fn_analyze.neurons.magnitude`'s statistics `mean` and `mean_square`).
"""

from __future__ import annotations

import numpy as np

from fn_analyze.neurons.magnitude import NeuronStats, Statistic
from shared.arch import DownProjection, base_layer

MOMENTS: tuple[Statistic, ...] = ("mean", "mean_square")  # the statistics importance needs


def importance(stats: NeuronStats, projections: list[DownProjection], compensated: bool) -> np.ndarray:
    """(n_layers, intermediate_size) expected squared change of a block's output when the neuron alone
    is removed: Var(a) |w|^2 when its mean is compensated, E[a^2] |w|^2 when it is cut."""
    spread = stats.variance if compensated else stats.need("mean_square")
    norms = np.stack([column_norms_squared(p) for p in projections])
    return spread * norms


def column_norms_squared(projection: DownProjection) -> np.ndarray:
    """|w_j|^2 of every neuron's down-projection column (float64)."""
    weight = base_layer(projection.module).weight.detach().double()
    axis = 0 if projection.orientation == "linear" else 1  # Linear weight is (out, in); Conv1D's is (in, out)
    return (weight**2).sum(dim=axis).cpu().numpy()
