"""The README's Python example runs as pasted, from the repository root, in a fresh process; then, in
the same process (one start and one import of torch for both), docs/example.py runs as a user runs
it, from a folder holding the demo data, and writes nothing there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fn_analyze.demo_data import write_demo_data
from tests.helpers.processes import ROOT, subprocess_env

EXAMPLE_BEGINS = "--- docs/example.py ---"

# The README's block first, as `python -c` runs it from the root, then the example as `python docs/example.py`
# runs it from the demo data's folder.
_README_THEN_EXAMPLE = f"""
import os, runpy, sys
readme_block, example, folder = sys.argv[1:]
exec(compile(readme_block, "README.md", "exec"), {{"__name__": "__main__"}})
print({EXAMPLE_BEGINS!r}, flush=True)
os.chdir(folder)
runpy.run_path(example, run_name="__main__")
"""


@pytest.mark.slow  # the embedded model: about 70 s, 30 s more the first time (its conversion)
def test_the_readmes_python_example_and_the_notebook_example_run_as_given(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- python-example -->\n```python\n(.*?)```", readme, re.DOTALL)
    assert found, "README.md lost its <!-- python-example --> block"
    write_demo_data(tmp_path / "demo")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-c", _README_THEN_EXAMPLE, found.group(1), str(ROOT / "docs" / "example.py"), str(tmp_path)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    readme_output, example_output = result.stdout.split(EXAMPLE_BEGINS + "\n")
    change = float(re.search(r"networks 0 and 3 off: ([0-9.]+)", readme_output).group(1))
    assert change > 0  # the mask changed the logits

    assert re.search(r"^k=10: [1-9]\d* stable networks", example_output, re.MULTILINE), example_output
    base, off = map(float, re.search(r"^loss (\S+) -> (\S+) with network 0 ", example_output, re.MULTILINE).groups())
    assert np.isfinite([base, off]).all() and off != base  # the mask changed the model's answers
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
