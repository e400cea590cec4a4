"""The figure of a mask file's networks, and how every PNG figure of the project is made and saved.

The figures are matplotlib `Figure`s drawn on their own Agg canvas, never through pyplot:
no screen is needed, and the caller's backend (a notebook's inline one) is left as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shared.jsonio import atomic_file
from shared.masks import MaskFile

NETWORK_COLOR = "#1f4e79"
ANNOTATE_LIMIT = 30  # cells are labelled with their value up to this many rows and columns


def agg_figure(**kwargs: Any) -> Figure:
    """A figure on its own Agg canvas (pyplot's figure manager and backend are not involved)."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> None:
    with atomic_file(Path(path)) as handle:
        fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")


def networks_figure(mask: MaskFile) -> Figure:
    """Neurons of each network in each layer (heatmap), with each network's size beside it."""
    n_layers = mask.model.n_layers
    counts = np.array(
        [[len(network.layers.get(layer, ())) for layer in range(n_layers)] for network in mask.networks], dtype=float
    ).reshape(len(mask.networks), n_layers)
    fig = agg_figure(figsize=(3 + 0.3 * n_layers, 1.5 + 0.3 * max(len(mask.networks), 1)))
    ax, side = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(n_layers, 1), 6]}, sharey=True)
    shown = np.where(counts > 0, counts, np.nan)  # empty cells stay blank
    image = ax.imshow(shown, cmap="magma_r", aspect="auto", vmin=0, vmax=max(counts.max(initial=0), 1))
    fig.colorbar(image, ax=side, label="neurons in the layer", location="right")
    ax.set_xticks(range(n_layers), [str(layer) for layer in range(n_layers)], fontsize=7)
    ax.set_yticks(range(len(mask.networks)), [f"network {n.id}" for n in mask.networks], fontsize=7)
    ax.set_xlabel(f"layer (each of {mask.model.intermediate_size} MLP neurons)")
    if len(mask.networks) <= ANNOTATE_LIMIT and n_layers <= 2 * ANNOTATE_LIMIT:
        for (row, col), value in np.ndenumerate(counts):
            if value > 0:
                color = "white" if value > 0.5 * counts.max() else "black"
                ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=5, color=color)
    side.barh(range(len(mask.networks)), [n.size for n in mask.networks], color=NETWORK_COLOR)
    side.set_xlabel("size (neurons)")
    fig.suptitle(f"{len(mask.networks)} networks of {mask.model.name}: neurons per layer", fontsize=10)
    return fig
