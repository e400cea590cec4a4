"""`fn-train` (alias `fnsft`): supervised fine-tuning with functional networks masked.

The options are TrainConfig's fields (fn_train/config.py holds their defaults and help).
Flags keep the seed tool's underscore spelling (`--model_name_or_path`); each also
answers to its hyphenated form (`--model-name-or-path`).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from fn_train import config as train_config
from shared.cli import PlainHelpCommand, config_options, handle_errors, library_warnings, setup_logging, typer_app
from shared.threads import set_thread_defaults


@config_options(train_config.TrainConfig, both_spellings=True, config_file="fn-train")
def run(
    settings: dict[str, Any],
    verbose: Annotated[bool, typer.Option("--verbose/--quiet", help="Log progress details.")] = False,
) -> None:
    """Fine-tune with TRL's SFTTrainer while a mask switches functional networks off or isolates them."""
    setup_logging(verbose)
    from shared.models import check_model_reachable

    check_model_reachable(settings["model_name_or_path"])  # offline, an unknown model fails before the heavy imports
    from fn_train.trainer import train

    with library_warnings(verbose):
        train(train_config.TrainConfig(**settings))


app = typer_app()
app.command(help=run.__doc__, cls=PlainHelpCommand)(handle_errors("fn-train")(run))


def main() -> None:
    set_thread_defaults()  # before torch loads: see shared/threads.py
    app()


if __name__ == "__main__":
    main()
