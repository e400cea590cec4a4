"""A `shared/` package in the folder Python runs from shadows the project's; importing fn_analyze or
fn_train then says what happened in one line instead of failing later on a missing name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.processes import ROOT, subprocess_env


@pytest.mark.parametrize("package", ["fn_analyze", "fn_train.config"])
def test_a_shared_folder_of_ones_own_is_named(tmp_path: Path, package: str) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "__init__.py").write_text("")  # the user's own helpers
    result = subprocess.run(
        [sys.executable, "-c", f"import {package}"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: the package 'shared' was imported from ") and str(tmp_path) in last
    assert f"not from {ROOT / 'shared'}" in last and "rename that one" in last


def test_without_a_shared_folder_the_import_works(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import fn_train.config"], cwd=tmp_path, env=subprocess_env(), capture_output=True
    )
    assert result.returncode == 0, result.stderr
