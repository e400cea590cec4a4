"""The README's Python example runs as pasted, from the repository root, in a fresh process."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers.processes import ROOT, subprocess_env


@pytest.mark.slow  # the embedded model: about 10 s, or 30 s the first time (its conversion)
def test_the_readmes_python_example_runs_as_pasted() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- python-example -->\n```python\n(.*?)```", readme, re.DOTALL)
    assert found, "README.md lost its <!-- python-example --> block"
    result = subprocess.run(
        [sys.executable, "-c", found.group(1)], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    change = float(re.search(r"networks 0 and 3 off: ([0-9.]+)", result.stdout).group(1))
    assert change > 0  # the mask changed the logits
