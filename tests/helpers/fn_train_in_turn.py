"""fn-train's command line run once per argument list, in turn, in this process: under torchrun,
several runs share one launch of the ranks (`python -m tests.helpers.fn_train_in_turn '[[...], [...]]'`)."""

from __future__ import annotations

import json
import sys

from fn_train.cli import main

if __name__ == "__main__":
    for args in json.loads(sys.argv[1]):
        sys.argv = ["fn-train", *args]
        try:
            main()
        except SystemExit as done:  # the command line ends with it, 0 on success
            if done.code:
                raise
