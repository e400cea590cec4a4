"""`fn-train` (alias `fnsft`): supervised fine-tuning with functional networks masked, and
`fn-train experiment --config FILE`: the arms, seeds and random controls of a comparison in one command.

The training options are TrainConfig's fields (fn_train/config.py holds their defaults and help).
Flags keep the seed tool's underscore spelling (`--model_name_or_path`); each also
answers to its hyphenated form (`--model-name-or-path`). The experiment is a second typer app that
`main` dispatches to on its first argument, so `fn-train --flags` stays the training command.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fn_train import config as train_config
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
from shared.errors import ParameterError, UserError
from shared.options import flag_namer
from shared.progress import progress_shown_while
from shared.threads import set_thread_defaults

EXPERIMENT = "experiment"


@config_options(train_config.TrainConfig, both_spellings=True, config_file="fn-train")
def run(
    settings: dict[str, Any],
    verbose: Annotated[
        Optional[bool],
        typer.Option("--verbose/--quiet", help="Log progress details / no progress bars (default: bars only)."),
    ] = None,
) -> None:
    """Fine-tune with TRL's SFTTrainer while a mask switches functional networks off or isolates them.
    `fn-train experiment --config FILE` compares arms over seeds against random neurons (see its --help)."""
    setup_logging(bool(verbose))
    from shared.early_checks import check_inputs

    config = train_config.TrainConfig(**settings)
    check_inputs(config)  # a missing file, a wrong column, an unknown model: refused before the heavy imports
    load_libraries()
    from fn_train.trainer import train

    with library_warnings(bool(verbose)), progress_on_stdout(), progress_shown_while(verbose is not False):
        train(config)


def experiment(
    config: Annotated[Path, typer.Option("--config", help="The experiment's YAML file (docs/commands.md).")],
    keep_runs: Annotated[
        bool, typer.Option("--keep-runs/--no-keep-runs", help="Keep each run's folder (adapter, fn_mask.json).")
    ] = False,
    verbose: Annotated[
        Optional[bool],
        typer.Option("--verbose/--quiet", help="Log progress details / no progress bars (default: bars only)."),
    ] = None,
) -> None:
    """Fine-tune every arm (plain LoRA; networks off: key; only them kept: complement; only their neurons
    learning: tune) over seeds, each masked arm next to random neurons of the same counts per layer and per
    magnitude bin; score each on the task's held-out rows and a retention set. Writes results.json, table.txt
    and results.png in the config's out folder; re-run the same command to resume an interrupted experiment."""
    setup_logging(bool(verbose))
    from fn_train.experiment.config import load_experiment_config

    settings = load_experiment_config(config)
    from shared.models import check_model_reachable

    check_model_reachable(settings.model)
    load_libraries()
    from fn_train.experiment.report import format_table
    from fn_train.experiment.runner import run_experiment

    try:
        with library_warnings(bool(verbose)), progress_on_stdout(), progress_shown_while(verbose is not False):
            results = run_experiment(settings, keep_runs=keep_runs)
    except ParameterError as exc:  # a run's fn-train settings (train: in the file), worded as fn-train's flags
        raise UserError(exc.as_flags(flag_namer(train_config.TrainConfig, both_spellings=True))) from exc
    typer.echo(format_table(results))


app = typer_app()
app.command(help=run.__doc__, cls=PlainHelpCommand)(handle_errors("fn-train")(run))
experiment_app = typer_app()
experiment_app.command(help=experiment.__doc__, cls=PlainHelpCommand)(handle_errors("fn-train experiment")(experiment))


def main() -> None:
    set_thread_defaults()  # before torch loads: see shared/threads.py
    if sys.argv[1:2] == [EXPERIMENT]:
        experiment_app(sys.argv[2:], prog_name=f"{Path(sys.argv[0]).name} {EXPERIMENT}")
    else:
        app()


if __name__ == "__main__":
    main()
