"""What a long library call says as it goes ("ica: 18 networks covering ..."): INFO records of the
loggers under `PROGRESS`, one per stage.

Called from Python, the library prints nothing: the records go wherever the caller's logging
sends INFO (`logging.basicConfig(level=logging.INFO)` shows them). The commands print them on
stdout, one plain line each (`shared.cli.progress_on_stdout`).
"""

from __future__ import annotations

import logging

PROGRESS = "fn.progress"


def progress_log(stage: str) -> logging.Logger:
    """The logger of one stage's progress lines (`fn.progress.<stage>`)."""
    return logging.getLogger(f"{PROGRESS}.{stage}")
