"""`fn-analyze report`: one self-contained HTML page about one mask file.

The page joins what the project knows of the file: its provenance and how to reproduce it (`show`'s
description, the file's digest, the data and ICA settings it records, the networks' figure), the
network cards (what each network responds to), and, when given, `evaluate`'s table and figure for
each results file (a plain, `--tuned` or `--pruned` evaluation) and each experiment's table and
figure. Styles are inline and figures are PNG data URIs: the page fetches nothing, reads offline,
prints, and stays small enough to attach to a message.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fn_analyze.config import CollectConfig, ReportConfig
from fn_analyze.report.cards import NetworkCards, network_cards
from fn_analyze.report.show import describe
from shared import __version__
from shared.constants import EVALUATION_SCHEMA_VERSION, EXPERIMENT_FIGURE_NAME, EXPERIMENT_TABLE_NAME
from shared.digests import file_digest
from shared.errors import UserError
from shared.figures import networks_figure
from shared.jsonio import write_text_atomic
from shared.masks import MaskFile, load_mask_file, parse_network_ids

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 70rem; margin: 1.5rem auto; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { border-bottom: 1px solid #ccc; margin-top: 2rem; } h3 { margin: 0 0 .3rem; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; font-size: 12px; white-space: pre; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0; }
table { border-collapse: collapse; font-size: 12.5px; }
td, th { border-bottom: 1px solid #e3e3e3; padding: 2px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; } dt { font-weight: bold; }
@media print { body { max-width: none; margin: 0; font-size: 11px; } pre { white-space: pre-wrap; }
  .card, img, pre { break-inside: avoid; }
  h2 { break-after: avoid; } }
"""


@dataclass(frozen=True)
class WrittenReport:
    path: Path
    bytes: int
    seconds: float
    cards: NetworkCards

    def summary(self) -> str:
        return (
            f"report: {self.path} ({self.bytes / 1024:.0f} KiB, {len(self.cards.cards)} network cards, "
            f"{self.seconds:.1f} s)"
        )


def _png(figure: Any) -> str:
    """A matplotlib figure as an <img> with a PNG data URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return _img(buffer.getvalue(), "figure")


def _img(data: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(data).decode('ascii')}'>"


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def _provenance(mask: MaskFile, path: Path) -> str:
    source = mask.source
    acts, ica = source.get("activations", {}), source.get("ica", {})
    dataset = acts.get("dataset", {}) if isinstance(acts.get("dataset"), dict) else {}
    facts = {
        "file": str(path),
        "digest": file_digest(path),
        "made by": mask.created_by,
        "schema": mask.schema_version,
        "model": f"{mask.model.name} ({mask.model.model_type}, fingerprint {mask.model.fingerprint})",
        "data": f"{dataset.get('source', '?')} (digest {dataset.get('digest', '?')}, "
        f"{dataset.get('n_records', '?')} records)",
        "tokens": acts.get("n_tokens", "?"),
        "activations manifest": acts.get("manifest_digest", acts.get("manifest", "?")),
        "ICA": ", ".join(
            f"{key} {ica[key]}" for key in ("solver", "n_components", "seed", "runs", "splits", "scale") if key in ica
        ),
    }
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items())
    return (
        "<h2>Provenance and reproducibility</h2>"
        f"<dl>{rows}</dl>{_pre(describe(mask))}"
        "<p>Each network's neurons per layer:</p>" + _png(networks_figure(mask))
    )


def _evaluation(path: Path) -> str:
    """evaluate's results (plain, --tuned or --pruned): the table it printed and its figure."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--evaluation {path} cannot be read as evaluate's results JSON ({exc})") from exc
    version = results.get("schema_version") if isinstance(results, dict) else None
    if version != EVALUATION_SCHEMA_VERSION:
        raise UserError(
            f"--evaluation {path} has schema_version {version!r}, this tool reads {EVALUATION_SCHEMA_VERSION}; "
            "run `fn-analyze evaluate` again to rewrite it"
        )
    kind = results.get("kind")
    try:
        if kind == "tuned":
            from fn_analyze.measure.tuned import format_tuned_table
            from fn_analyze.report.folder_plots import plot_tuned

            title, table, plot = "Evaluation: tuned against their base", format_tuned_table(results), plot_tuned
        elif kind == "pruned":
            from fn_analyze.prune.pruned_eval import format_pruned_table
            from fn_analyze.report.folder_plots import plot_pruned

            title, table, plot = "Pruning", format_pruned_table(results), plot_pruned
        else:
            from fn_analyze.report.eval_table import format_table
            from fn_analyze.report.plots import plot_evaluation

            title, table, plot = "Evaluation", format_table(results), plot_evaluation
        with tempfile.TemporaryDirectory() as folder:
            figure = Path(folder) / "evaluation.png"
            plot(results, figure)
            image = _img(figure.read_bytes(), "evaluation figure")
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(
            f"--evaluation {path} is not a results JSON of `fn-analyze evaluate` (missing {exc}); give the file "
            "evaluate wrote (its `results:` line)"
        ) from exc
    return f"<h2>{title} ({html.escape(str(path))})</h2>" + _pre(table) + image


def _experiment(folder: Path) -> str:
    table, figure = folder / EXPERIMENT_TABLE_NAME, folder / EXPERIMENT_FIGURE_NAME
    missing = [p.name for p in (table, figure) if not p.is_file()]
    if missing:
        raise UserError(
            f"--experiment {folder} holds no {missing[0]}; give the --out folder of a finished `fn-train experiment`"
        )
    return (
        f"<h2>Experiment ({html.escape(str(folder))})</h2>"
        + _pre(table.read_text(encoding="utf-8"))
        + _img(figure.read_bytes(), "experiment figure")
    )


def _count(paths: list[Path], noun: str) -> str:
    """`, 2 evaluations` for the contents line; nothing for none."""
    return "" if not paths else f", {len(paths)} {noun}{'s' if len(paths) > 1 else ''}"


def _rows(config: ReportConfig, mask: MaskFile):
    if config.activations is not None:
        return config.activations
    from fn_analyze.record.model_rows import model_rows

    return model_rows(
        CollectConfig(
            dataset=str(config.dataset), out=Path("unused"), model=mask.model.name, max_tokens=config.max_tokens
        )
    )


def write_report(config: ReportConfig) -> WrittenReport:
    """Write the page (atomically: a reader never sees half of it) and say where, how large, how long."""
    started = time.perf_counter()
    mask = load_mask_file(config.mask_file)
    # The inputs are read before anything is drawn, so a bad one is refused before the slow part.
    extras = [_evaluation(path) for path in config.evaluation] + [_experiment(path) for path in config.experiment]
    cards = network_cards(mask, _rows(config, mask), parse_network_ids(config.networks), top=config.top)
    cards = replace(cards, mask_name=str(config.mask_file))
    title = f"Functional networks of {mask.model.name}: {config.mask_file.name}"
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>Written by functional-networks {html.escape(__version__)} on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Contents: provenance, "
        f"{len(cards.cards)} network cards{_count(config.evaluation, 'evaluation')}"
        f"{_count(config.experiment, 'experiment')}.</p>"
        + _provenance(mask, config.mask_file)
        + "<h2>What each network responds to</h2>"
        + cards._repr_html_()
        + "".join(extras)
        + "</body></html>"
    )
    assert config.out is not None
    config.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config.out, page)
    return WrittenReport(config.out, config.out.stat().st_size, time.perf_counter() - started, cards)
