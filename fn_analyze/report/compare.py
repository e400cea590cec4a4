"""`fn-analyze compare A.json B.json`: do two mask files find the same networks?

For mask files of one model made with other seeds, data or sizes: the IoU
(intersection over union of (layer, neuron) pairs) of every network of A with every
network of B, each network's best match in the other file, and the one-to-one
matching that maximizes the summed IoU (Hungarian algorithm). A network that is
stable across runs has a match with IoU near 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from fn_analyze.config import CompareConfig
from shared import __version__
from shared.constants import COMPARISON_SCHEMA_VERSION
from shared.errors import UserError
from shared.jsonio import write_json_atomic
from shared.masks import MaskFile, iou_matrix, load_mask_file

REPRODUCED_AT = (0.8, 0.5)  # IoU levels of the one-line reproducibility figure


def matched_one_to_one(matrix: np.ndarray) -> list[tuple[int, int, float]]:
    """(row, column, IoU) pairs of the one-to-one matching that maximizes the summed IoU."""
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    return [(int(r), int(c), float(matrix[r, c])) for r, c in zip(rows, cols, strict=True)]


def reproduced(matrix: np.ndarray, levels: tuple[float, ...] = REPRODUCED_AT) -> dict[str, dict[str, float]]:
    """For each IoU level: how many networks are matched one to one at or above it, out of the
    larger file's count (a file that emits networks the other lacks is not reproduced)."""
    ious = [iou for _, _, iou in matched_one_to_one(matrix)]
    out_of = max(matrix.shape) if matrix.size else 0
    figures = {}
    for level in levels:
        matched = sum(iou >= level for iou in ious)
        figures[f"{level:g}"] = {"matched": matched, "of": out_of, "share": matched / out_of if out_of else 0.0}
    return figures


def format_reproduced(figures: dict[str, dict[str, float]]) -> str:
    return "reproducibility: " + ", ".join(
        f"{f['matched']}/{f['of']} ({100 * f['share']:.0f}%) matched one to one at IoU >= {level}"
        for level, f in figures.items()
    )


def _check_same_model(a: MaskFile, b: MaskFile, path_a: Path, path_b: Path) -> None:
    for key in ("fingerprint", "n_layers", "intermediate_size"):
        if getattr(a.model, key) != getattr(b.model, key):
            raise UserError(
                f"{path_a} and {path_b} were made for different models ({key} {getattr(a.model, key)} vs "
                f"{getattr(b.model, key)}); compare mask files of one model"
            )


def compare(config: CompareConfig) -> dict[str, Any]:
    """IoU matrix, best matches and matching of two mask files; writes the JSON and the heatmap."""
    assert config.out is not None
    a, b = load_mask_file(config.mask_a), load_mask_file(config.mask_b)
    _check_same_model(a, b, config.mask_a, config.mask_b)
    matrix = iou_matrix(a, b)
    ids_a, ids_b = a.network_ids(), b.network_ids()

    def best(rows: np.ndarray, ids_from: list[int], ids_to: list[int]) -> list[dict[str, Any]]:
        if rows.shape[1] == 0:
            return [{"network": i, "match": None, "iou": 0.0} for i in ids_from]
        return [
            {"network": ids_from[r], "match": ids_to[int(rows[r].argmax())], "iou": float(rows[r].max())}
            for r in range(rows.shape[0])
        ]

    matching = [{"a": ids_a[r], "b": ids_b[c], "iou": iou} for r, c, iou in matched_one_to_one(matrix)]
    best_a, best_b = best(matrix, ids_a, ids_b), best(matrix.T, ids_b, ids_a)
    result = {
        "schema_version": COMPARISON_SCHEMA_VERSION,
        "created_by": f"functional-networks {__version__}",
        "a": {"file": str(config.mask_a), "networks": ids_a, "sizes": [n.size for n in a.networks]},
        "b": {"file": str(config.mask_b), "networks": ids_b, "sizes": [n.size for n in b.networks]},
        "iou": matrix.tolist(),
        "best_match_a_in_b": best_a,
        "best_match_b_in_a": best_b,
        "matching": matching,
        "mean_best_iou_a": float(np.mean([m["iou"] for m in best_a])) if best_a else 0.0,
        "mean_best_iou_b": float(np.mean([m["iou"] for m in best_b])) if best_b else 0.0,
        "mean_matched_iou": float(np.mean([m["iou"] for m in matching])) if matching else 0.0,
        "reproduced": reproduced(matrix),
    }
    write_json_atomic(config.out, result)
    from fn_analyze.report.plots import plot_iou  # matplotlib is imported only when a plot is drawn

    plot_iou(matrix, ids_a, ids_b, config.mask_a.name, config.mask_b.name, config.plot_path)
    return result


def format_comparison(result: dict[str, Any]) -> str:
    """The printed report: each network of A with its best match in B, then the one-to-one matching."""
    a, b = result["a"], result["b"]
    sizes_b = dict(zip(b["networks"], b["sizes"], strict=True))
    matched = {m["a"]: m for m in result["matching"]}
    lines = [
        f"A: {a['file']} ({len(a['networks'])} networks)   B: {b['file']} ({len(b['networks'])} networks)",
        f"mean best IoU: A in B {result['mean_best_iou_a']:.3f}, B in A {result['mean_best_iou_b']:.3f}; "
        f"one-to-one matching {result['mean_matched_iou']:.3f}",
        "",
        format_reproduced(result["reproduced"]),
        "",
        f"{'A net':>5} {'size':>6} | {'best in B':>9} {'size':>6} {'IoU':>6} | {'matched B':>9} {'IoU':>6}",
    ]
    for entry, size in zip(result["best_match_a_in_b"], a["sizes"], strict=True):
        best = entry["match"]
        pair = matched.get(entry["network"])
        lines.append(
            f"{entry['network']:>5} {size:>6} | {'-' if best is None else best:>9} "
            f"{'-' if best is None else sizes_b[best]:>6} {entry['iou']:>6.3f} | "
            f"{'-' if pair is None else pair['b']:>9} {'-' if pair is None else format(pair['iou'], '.3f'):>6}"
        )
    return "\n".join(lines)
