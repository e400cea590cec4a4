"""`fn-analyze show`: what a mask file holds, network by network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fn_analyze.neurons.neuron_sets import set_size
from shared.masks import MASSIVE, MaskFile, load_mask_file, made_for, union

BARS = " ▁▂▃▄▅▆▇█"


def layer_profile(counts: list[int]) -> str:
    """One character per layer, its height the layer's share of the network's largest layer."""
    top = max(counts) if counts else 0
    if top == 0:
        return " " * len(counts)
    return "".join(BARS[0 if c == 0 else max(1, round(8 * c / top))] for c in counts)


def _figure(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _threshold_rule(ica: dict[str, Any]) -> str:
    """Files before schema 2's consensus kept the positive tail only (rule "zscore"/"percentile")."""
    both = str(ica.get("threshold_rule", "")).startswith("abs-")
    value = "|z|" if both else "z"
    if ica.get("percentile") is not None:
        return f"{value} above percentile {ica['percentile']}"
    return f"{value} >= {ica.get('threshold', '?')}"


def _how_made(mask: MaskFile) -> str:
    ica, acts = mask.source.get("ica", {}), mask.source.get("activations", {})
    made = (
        f"made by: {mask.created_by}; {mask.source.get('method', '?')} on {acts.get('n_tokens', '?')} tokens, "
        f"{ica.get('n_components', '?')} components, threshold {_threshold_rule(ica)}"
    )
    if "runs" not in ica:
        return made + "; one ICA run (schema 1: stability and reappearance across restarts, no consensus)"
    requested = ica.get("n_components_requested")
    chosen = f" (chosen by auto: stable networks per k {ica.get('stable_per_k')})" if requested == "auto" else ""
    splits = f" and on each of its {ica['splits']} splits of the records" if ica.get("splits") else ""
    return _preprocessing_line(ica) + (
        f"{made}{chosen}\nconsensus of {ica['runs']} {ica.get('solver', '?')} runs"
        f"{' on bootstrap resamples' if ica.get('bootstrap') else ''} on the whole data{splits}"
        f"; a network is stable at quality >= "
        f"{ica.get('min_quality')}, share >= {ica.get('min_share')}"
        + (f" and run IoU >= {ica['min_run_iou']}" if "min_run_iou" in ica else "")
    )


def _preprocessing_line(ica: dict[str, Any]) -> str:
    """What the ICA did to the data before it ("" for none, or a file older than the options)."""
    parts = []
    if ica.get("exclude_positions") or ica.get("exclude_token_ids"):
        parts.append(
            f"{ica.get('rows_kept', '?')} token rows kept (positions {ica.get('exclude_positions') or '-'} and "
            f"token ids {ica.get('exclude_token_ids') or '-'} left out)"
        )
    if ica.get("clip_percentile") is not None:
        parts.append(f"clipped at each neuron's {ica['clip_percentile']}th percentiles")
    if ica.get("scale", "none") != "none":
        parts.append(f"scale {ica['scale']}")
    aside = ica.get("set_aside", {}).get("size")  # the count; `set_aside_top` may read "auto"
    if aside:
        parts.append(f"the {aside} largest-magnitude neurons set aside")
    return f"preprocessing: {'; '.join(parts)}\n" if parts else ""


USES = {
    "key": "made for: switching networks off (key), measured with mean ablation: the massive neurons were set aside",
    "complement": "made for: keeping only the networks (complement): every layer was weighted alike (--scale layer)",
}
NO_USE = (
    "made for: neither use measured well: no massive neuron was set aside, so switching these networks off "
    "mostly measures the massive neurons' magnitude; remake with the defaults (key) or --scale layer (complement)"
)


def describe(mask: MaskFile) -> str:
    model = mask.model
    total = model.n_layers * model.intermediate_size
    one_run = "runs" not in mask.source.get("ica", {})
    first, second = ("stab.", "reap.") if one_run else ("qual.", "share")
    runs_header = "" if one_run else f" {'runs':>5}"  # run IoU: consensus files only
    lines = [
        f"model: {model.name} ({model.model_type}, {model.n_layers} layers x {model.intermediate_size} neurons, "
        f"fingerprint {model.fingerprint})",
        _how_made(mask),
        USES.get(made_for(mask) or "", NO_USE),
        f"{len(mask.networks)} networks; per-layer profile: one column per layer, 0 to {model.n_layers - 1}",
        "",
        f"{'id':>4} {'size':>6} {'% all':>6} {'layers':>6} {first:>5} {second:>5}{runs_header}  profile",
    ]
    for network in mask.networks:
        counts = [len(network.layers.get(layer, ())) for layer in range(model.n_layers)]
        stats = network.stats
        figures = (
            (stats.get("stability"), stats.get("reappearance"))
            if one_run
            else (stats.get("quality"), stats.get("share"))
        )
        unstable = "" if stats.get("stable", True) else "  (unstable, kept by --keep-unstable)"
        run_iou = "" if one_run else f" {_figure(stats.get('run_iou')):>5}"
        lines.append(
            f"{network.id:>4} {network.size:>6} {100 * network.size / total:>5.2f}% {len(network.layers):>6} "
            f"{_figure(figures[0]):>5} {_figure(figures[1]):>5}{run_iou}  |{layer_profile(counts)}|{unstable}"
        )
    covered = set_size(union(mask.networks))
    lines.append("")
    lines.append(f"union: {covered} neurons ({100 * covered / total:.2f}% of {total})")
    aside = mask.source.get("ica", {}).get("set_aside")
    if aside:
        profile = [len(aside.get("layers", {}).get(str(layer), ())) for layer in range(model.n_layers)]
        lines.append(
            f"set aside ({aside.get('size')} largest-magnitude neurons, in no network; select them with "
            f"--networks {MASSIVE}): |{layer_profile(profile)}|"
        )
    left_out = mask.source.get("ica", {}).get("unstable", [])
    if left_out:
        lines.append(f"left out as unstable ({len(left_out)}; `fn-analyze ica --keep-unstable` emits them):")
        lines.extend(
            f"  component {c.get('component')}: size {c.get('size')}, quality {_figure(c.get('quality'))}, "
            f"share {_figure(c.get('share'))}, run IoU {_figure(c.get('run_iou'))}"
            for c in left_out
        )
    return "\n".join(lines)


def show(path: Path, plot: Path | None = None) -> str:
    """The description of a mask file; with `plot`, also a PNG of each network's neurons per layer."""
    mask = load_mask_file(path)
    if plot is not None:
        from fn_analyze.report.plots import plot_networks  # matplotlib is imported only when a plot is drawn

        plot_networks(mask, plot)
    return describe(mask)
