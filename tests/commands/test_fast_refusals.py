"""A bad path, column or flag is refused before torch, transformers and datasets load: each case
runs the real command in a fresh interpreter, checks the one-line refusal, that none of the heavy
libraries was imported, and (with a generous bound, for a busy machine) how long it took."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.processes import subprocess_env

HEAVY = ("torch", "transformers", "datasets")

# Runs a command's main() as its console script would, then prints which heavy libraries it imported.
_PROBE = """
import sys
module, argv = sys.argv[1], sys.argv[2:]
sys.argv = [module, *argv]
import importlib
try:
    importlib.import_module(module).main()
except SystemExit:
    pass
print("imported:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""

# Generous: the refusals take about 1 s on the 2-core machine under load 5 (7-19 s before the heavy
# imports moved after the checks).
BOUND_S = 5.0


def _refused_fast(tmp_path: Path, module: str, args: list[str], fragment: str) -> None:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), module, *args],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and fragment in errors[0], result.stderr
    assert result.stdout.strip().splitlines()[-1] == "imported:", result.stdout
    assert elapsed < BOUND_S, f"refused after {elapsed:.1f} s"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    columns = tmp_path / "cols.csv"
    columns.write_text("q,a\nwhat,that\n")
    return {"qa": qa, "cols": columns, "missing": tmp_path / "missing.jsonl", "nomask": tmp_path / "none.json"}


CASES = [
    ("fn_analyze.cli", ["collect", "--dataset", "{missing}", "--out", "acts"], "does not exist"),
    ("fn_analyze.cli", ["collect", "--dataset", "{cols}", "--out", "acts"], "has columns q, a, which match no"),
    ("fn_analyze.cli", ["collect", "--dataset", "{qa}", "--out", "acts", "--data-format", "alpaca"], "lacks column"),
    ("fn_analyze.cli", ["collect", "--dataset", "{qa}", "--out", "acts", "--model", "./no-model"], "does not exist"),
    ("fn_analyze.cli", ["collect", "--dataset", "{qa}", "--out", "acts", "--no-such-flag"], "No such option"),
    ("fn_analyze.cli", ["ica", "--activations", "no-acts", "--out", "m.json"], "does not exist"),
    ("fn_analyze.cli", ["ica", "--model", "./no-model", "--dataset", "{qa}"], "does not exist"),
    ("fn_analyze.cli", ["evaluate", "--mask-file", "{nomask}", "--dataset", "{qa}"], "does not exist"),
    (
        "fn_analyze.cli",
        ["prune", "--mask-file", "{nomask}", "--out", "p", "--keep", "0.5", "--dataset", "{qa}"],
        "does not",
    ),
    ("fn_analyze.cli", ["compare", "{nomask}", "{nomask}"], "does not exist"),
    ("fn_train.cli", ["--dataset_name_or_path", "{missing}", "--output_dir", "o"], "does not exist"),
    ("fn_train.cli", ["--dataset_name_or_path", "{cols}", "--output_dir", "o"], "which match no known format"),
    ("fn_train.cli", ["--dataset_name_or_path", "{qa}", "--output_dir", "o", "--mask_file", "{nomask}"], "does not"),
    ("fn_train.cli", ["experiment", "--config", "{nomask}"], "does not exist"),
]


@pytest.mark.parametrize(("module", "args", "fragment"), CASES, ids=lambda value: None)
def test_bad_input_is_refused_before_the_heavy_libraries_load(
    tmp_path: Path, files: dict[str, Path], module: str, args: list[str], fragment: str
) -> None:
    filled = [arg.format(**files) for arg in args]
    _refused_fast(tmp_path, module, filled, fragment)
