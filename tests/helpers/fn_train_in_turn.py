"""fn-train's command line run once per argument list, in turn, in this process: under torchrun,
several runs share one launch of the ranks (`python -m tests.helpers.fn_train_in_turn '[[...], [...]]'`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fn_train.cli import main
from shared.constants import RUN_CONFIG_NAME
from shared.distributed import ranks_from_env


def wait_for_the_main_rank(args: list[str]) -> None:
    """Return once the main rank has written the run's config into its output folder. Every rank checks
    the folder while the main rank writes its config there (a temporary file, then renamed): a rank that
    meets the temporary file refuses the folder. The ranks of a fresh launch start staggered by their
    imports; ranks that go on from one run to the next start the next together, so the others wait."""
    config = Path(args[args.index("--output_dir") + 1]) / RUN_CONFIG_NAME
    while not config.exists():
        time.sleep(0.05)


if __name__ == "__main__":
    for turn, args in enumerate(json.loads(sys.argv[1])):
        if turn and not ranks_from_env().is_main:
            wait_for_the_main_rank(args)
        sys.argv = ["fn-train", *args]
        try:
            main()
        except SystemExit as done:  # the command line ends with it, 0 on success
            if done.code:
                raise
