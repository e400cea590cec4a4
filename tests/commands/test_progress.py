"""Progress bars: on stderr in the commands (ica's passes and runs, training's steps), hidden with
--quiet, and never printed by a library call."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fn_analyze.cli import app as analyze_app
from fn_analyze.record.collect import CollectConfig, collect
from fn_train.cli import app as train_app
from shared.progress import progress_shown
from tests.helpers.training import train_args


def _bars(stderr: str, name: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith(name)]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, tiny_lm_dir: Path, demo_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("progress") / "acts"
    collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=out, model=str(tiny_lm_dir), max_tokens=400))
    return out


@pytest.mark.parametrize("flags", [[], ["--quiet"]])
def test_ica_shows_its_passes_and_runs_unless_quiet(small_folder: Path, tmp_path: Path, flags: list[str]) -> None:
    args = ["ica", "--activations", str(small_folder), "--n-components", "3", "--runs", "2", "--no-register"]
    result = CliRunner().invoke(analyze_app, [*flags, *args, "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert not progress_shown()  # the command's setting ended with it: a library call after it prints nothing
    passes, runs = _bars(result.stderr, "ica reduction"), _bars(result.stderr, "ica runs")
    if flags:
        assert passes == runs == [], result.stderr
    else:
        assert passes and "pass" in passes[-1] and "change=" in passes[-1], result.stderr
        assert runs and "run" in runs[-1], result.stderr
    assert "ica: " in result.stdout  # the stage lines either way


@pytest.mark.parametrize("flags", [[], ["--quiet"]])
def test_training_shows_its_steps_unless_quiet(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, flags: list[str]
) -> None:
    args = train_args(tiny_lm_dir, demo_dir / "train.csv", tmp_path / "out", max_steps=2)
    result = CliRunner().invoke(train_app, [*flags, *args])
    assert result.exit_code == 0, result.output
    assert not progress_shown()
    steps = [line for line in result.stderr.replace("\r", "\n").splitlines() if "2/2 [" in line]
    assert bool(steps) != bool(flags), result.stderr
