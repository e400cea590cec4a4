"""`fn-analyze`: collect activations, find networks by ICA, look at mask files.

Each command only builds a config and calls the public function that does the work; the
options of collect, ica, evaluate and compare are their configs' fields (fn_analyze/config.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fn_analyze.config import (
    CollectConfig,
    CompareConfig,
    EvaluateConfig,
    IcaConfig,
    PruneConfig,
    PrunedEvalConfig,
    ReportConfig,
    TunedEvalConfig,
    evaluation_config,
)
from fn_analyze.demo_data import FAMILIES
from shared.cli import (
    PlainHelpCommand,
    config_options,
    handle_errors,
    library_warnings,
    load_libraries,
    progress_on_stdout,
    setup_logging,
    typer_app,
)
from shared.progress import progress_shown_while
from shared.threads import set_thread_defaults

app = typer_app(help="Find functional networks (ICA over MLP neurons) in a language model.", no_args_is_help=True)


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[
        Optional[bool],
        typer.Option("--verbose/--quiet", "-v", help="Log progress details / no progress bars (default: bars only)."),
    ] = None,
) -> None:
    setup_logging(bool(verbose))
    ctx.with_resource(progress_shown_while(verbose is not False))  # bars unless --quiet, for the command
    ctx.with_resource(library_warnings(bool(verbose)))  # held until the command returns
    ctx.with_resource(progress_on_stdout())


def _inputs_checked(settings: dict[str, Any]) -> None:
    """The command's inputs checked (`shared.early_checks`, and an activations folder's manifest),
    then the heavy libraries loaded: a bad input is refused before they take their seconds."""
    from shared.early_checks import check_inputs

    check_inputs(settings)
    if settings.get("activations") is not None:
        from fn_analyze.record.activations import open_manifest

        open_manifest(Path(settings["activations"]))
    load_libraries()


@app.command("collect", cls=PlainHelpCommand)
@handle_errors("fn-analyze collect")
@config_options(CollectConfig)
def collect_command(settings: dict[str, Any]) -> None:
    """Record the input of every MLP down-projection for each real token, to float16 HDF5 shards.

    Re-running the same command after an interruption continues from the finished shards.
    Under `torchrun --nproc_per_node N` each process records its share into its own shards.
    """
    config = CollectConfig(**settings)
    _inputs_checked(settings)
    from fn_analyze.record.collect import collect

    collect(config)


@app.command("ica", cls=PlainHelpCommand)
@handle_errors("fn-analyze ica")
@config_options(IcaConfig)
def ica_command(settings: dict[str, Any]) -> None:
    """Find networks by spatial ICA over all captured neurons and write a mask file."""
    config = IcaConfig(**settings)
    _inputs_checked(settings)
    from fn_analyze.networks.ica import run_ica

    run_ica(config)


@app.command("verify", cls=PlainHelpCommand)
@handle_errors("fn-analyze verify")
def verify_command(
    activations: Annotated[Path, typer.Argument(help="Folder written by `fn-analyze collect`.")],
) -> None:
    """Read every shard of an activations folder and check it against the digest its manifest holds."""
    from fn_analyze.record.activations import verify_activations

    typer.echo(verify_activations(activations))


@app.command("show", cls=PlainHelpCommand)
@handle_errors("fn-analyze show")
def show_command(
    mask_file: Annotated[Path, typer.Argument(help="A mask file.")],
    plot: Annotated[
        Optional[Path], typer.Option(help="Also draw each network's neurons per layer to this PNG file.")
    ] = None,
    examples: Annotated[
        Optional[Path],
        typer.Option(
            help="Also print each network's card (its most active tokens in context) on this activations folder."
        ),
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="With --examples: most active tokens per network.")] = 10,
) -> None:
    """Print each network's size and how it spreads over layers; with --examples, what each responds to."""
    from fn_analyze.report.show import show

    cards = None
    if examples is not None:  # first: bad activations are refused before anything is printed or drawn
        from fn_analyze.report.cards import network_cards

        cards = network_cards(mask_file, examples, top=top)
    typer.echo(show(mask_file, plot))
    if plot is not None:
        typer.echo(f"plot: {plot}")
    if cards is not None:
        typer.echo("\n" + str(cards))


@app.command("report", cls=PlainHelpCommand)
@handle_errors("fn-analyze report")
@config_options(ReportConfig)
def report_command(settings: dict[str, Any]) -> None:
    """Write one self-contained HTML page about a mask file: provenance, network cards (what each network
    responds to), and evaluate's or an experiment's results when given."""
    from fn_analyze.report.page import write_report

    typer.echo(write_report(ReportConfig(**settings)).summary())


@app.command("evaluate", cls=PlainHelpCommand)
@handle_errors("fn-analyze evaluate")
@config_options(EvaluateConfig, TunedEvalConfig, PrunedEvalConfig)
def evaluate_command(given: dict[str, Any]) -> None:
    """Measure each network switched off, the union off and kept alone, against random neuron sets
    (answer-token loss; accuracy on multiple-choice data); with --tuned, fine-tuned folders next to their base
    and to each other; with --pruned, a pruned folder next to its original and random prunings."""
    config = evaluation_config(given)
    _inputs_checked(given)
    if isinstance(config, TunedEvalConfig):
        from fn_analyze.measure.tuned import evaluate_tuned, format_tuned_table

        typer.echo(format_tuned_table(evaluate_tuned(config)))
    elif isinstance(config, PrunedEvalConfig):
        from fn_analyze.prune.pruned_eval import evaluate_pruned, format_pruned_table

        typer.echo(format_pruned_table(evaluate_pruned(config)))
    else:
        from fn_analyze.measure.evaluate import evaluate
        from fn_analyze.report.eval_table import format_table

        typer.echo(format_table(evaluate(config)))
    typer.echo(f"results: {config.out}")
    typer.echo(f"plot: {config.plot_path}")


@app.command("compare", cls=PlainHelpCommand)
@handle_errors("fn-analyze compare")
@config_options(CompareConfig)
def compare_command(settings: dict[str, Any]) -> None:
    """IoU of every pair of networks of two mask files, best matches, and a heatmap."""
    from fn_analyze.report.compare import compare, format_comparison

    config = CompareConfig(**settings)
    typer.echo(format_comparison(compare(config)))
    typer.echo(f"results: {config.out}\nheatmap: {config.plot_path}")


@app.command("prune", cls=PlainHelpCommand)
@handle_errors("fn-analyze prune")
@config_options(PruneConfig)
def prune_command(settings: dict[str, Any]) -> None:
    """Remove MLP neurons physically, the same share per layer, keeping a mask file's networks first:
    a smaller, faster plain model folder, its provenance, and the mask remapped to it."""
    config = PruneConfig(**settings)
    _inputs_checked(settings)
    from fn_analyze.prune.pruning import format_prune_summary, prune

    typer.echo(format_prune_summary(prune(config)))


@app.command("demo-data", cls=PlainHelpCommand)
@handle_errors("fn-analyze demo-data")
def demo_data_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo data files.")] = Path("demo"),
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
    n_collect: Annotated[int, typer.Option(help="Records in data.jsonl (for collect).")] = 400,
    n_train: Annotated[int, typer.Option(help="Rows in train.csv.")] = 200,
    n_eval: Annotated[int, typer.Option(help="Rows in eval.csv.")] = 100,
    n_sentiment: Annotated[int, typer.Option(help="Rows in sentiment.csv (classification, for accuracy).")] = 100,
    n_general: Annotated[
        int, typer.Option(help="Records in general.jsonl (plain everyday prose, loss scored on every token).")
    ] = 100,
    families: Annotated[
        str,
        typer.Option(
            help="Task families of train.csv and eval.csv, comma-separated (leave out sentiment to "
            "keep sentiment.csv a retention set)."
        ),
    ] = ",".join(FAMILIES),
) -> None:
    """Write the demo instruction data (facts, arithmetic, sentiment, continuation), a
    sentiment classification set (question, choices, answer) for accuracy, and general.jsonl,
    plain English prose (text records) whose loss measures forgetting of general text."""
    from fn_analyze.demo_data import write_demo_data

    chosen = tuple(family.strip() for family in families.split(",") if family.strip())
    paths = write_demo_data(
        out,
        seed=seed,
        n_collect=n_collect,
        n_train=n_train,
        n_eval=n_eval,
        n_sentiment=n_sentiment,
        families=chosen,
        n_general=n_general,
    )
    for role, path in paths.items():
        typer.echo(f"{role}: {path}")


def main() -> None:
    set_thread_defaults()  # before torch loads: see shared/threads.py
    app()


if __name__ == "__main__":
    main()
