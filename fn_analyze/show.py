"""`fn-analyze show`: what a mask file holds, network by network."""

from __future__ import annotations

from pathlib import Path

from shared.masks import MaskFile, load_mask_file

BARS = " ▁▂▃▄▅▆▇█"


def layer_profile(counts: list[int]) -> str:
    """One character per layer, its height the layer's share of the network's largest layer."""
    top = max(counts) if counts else 0
    if top == 0:
        return " " * len(counts)
    return "".join(BARS[0 if c == 0 else max(1, round(8 * c / top))] for c in counts)


def describe(mask: MaskFile) -> str:
    model = mask.model
    total = model.n_layers * model.intermediate_size
    ica = mask.source.get("ica", {})
    acts = mask.source.get("activations", {})
    lines = [
        f"model: {model.name} ({model.model_type}, {model.n_layers} layers x {model.intermediate_size} neurons, "
        f"fingerprint {model.fingerprint})",
        f"made by: {mask.created_by}; {mask.source.get('method', '?')} on {acts.get('n_tokens', '?')} tokens, "
        f"{ica.get('n_components', '?')} components, threshold "
        + (
            f"percentile {ica['percentile']}"
            if ica.get("percentile") is not None
            else f"z >= {ica.get('threshold', '?')}"
        ),
        f"{len(mask.networks)} networks; per-layer profile: one column per layer, 0 to {model.n_layers - 1}",
        "",
        f"{'id':>4} {'size':>6} {'% all':>6} {'layers':>6} {'stab.':>5} {'reap.':>5}  profile",
    ]
    union: set[tuple[int, int]] = set()
    for network in mask.networks:
        counts = [len(network.layers.get(layer, ())) for layer in range(model.n_layers)]
        union.update((layer, n) for layer, ns in network.layers.items() for n in ns)
        stability, reappearance = network.stats.get("stability"), network.stats.get("reappearance")
        lines.append(
            f"{network.id:>4} {network.size:>6} {100 * network.size / total:>5.2f}% {len(network.layers):>6} "
            f"{'-' if stability is None else f'{stability:.2f}':>5} "
            f"{'-' if reappearance is None else f'{reappearance:.2f}':>5}  |{layer_profile(counts)}|"
        )
    lines.append("")
    lines.append(f"union: {len(union)} neurons ({100 * len(union) / total:.2f}% of {total})")
    return "\n".join(lines)


def show(path: Path, plot: Path | None = None) -> str:
    """The description of a mask file; with `plot`, also a PNG of each network's neurons per layer."""
    mask = load_mask_file(path)
    if plot is not None:
        from fn_analyze.plots import plot_networks  # matplotlib is imported only when a plot is drawn

        plot_networks(mask, plot)
    return describe(mask)
