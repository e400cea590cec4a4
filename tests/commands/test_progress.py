"""Progress bars: on stderr in the commands (ica's passes and runs, training's steps), hidden with
--quiet, and never printed by a library call; into a file or a pipe, plain lines, no redraws."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import shared.progress
from fn_analyze.cli import app as analyze_app
from fn_analyze.record.collect import CollectConfig, collect
from fn_train.cli import app as train_app
from shared.progress import progress_bar, progress_shown, progress_shown_while
from tests.helpers.processes import subprocess_env
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


def test_a_command_whose_stderr_is_a_file_writes_plain_lines_not_redraws(small_folder: Path, tmp_path: Path) -> None:
    log = tmp_path / "ica.log"
    args = ["ica", "--activations", str(small_folder), "--n-components", "3", "--runs", "2", "--no-register"]
    with log.open("wb") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "fn_analyze.cli", *args, "--out", str(tmp_path / "m.json")],
            env=subprocess_env(), stdout=subprocess.PIPE, stderr=stderr, timeout=300,
        )  # fmt: skip
    written = log.read_bytes()
    assert done.returncode == 0, written[-3000:]
    assert b"\r" not in written and b"\x1b[" not in written, written[-3000:]  # no carriage return, no cursor move
    lines = written.decode().splitlines()
    passes = [line for line in lines if line.startswith("ica reduction:")]
    runs = [line for line in lines if line.startswith("ica runs:")]
    # Each stage's last state once (the bars close within LOG_LINE_SECONDS), ASCII, with its counts.
    assert len(passes) == 1 and "pass" in passes[0] and "change=" in passes[0], written
    assert len(runs) == 1 and re.search(r" (\d+)/\1 \[", runs[0]), written  # at its end: n/n
    assert all(line.isascii() for line in passes + runs)


def test_plain_lines_come_at_most_every_few_seconds(monkeypatch) -> None:
    clock = iter(range(0, 10_000, 1))  # each reading of the clock is one second later
    monkeypatch.setattr(shared.progress.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    with progress_shown_while(True), progress_bar(total=100, desc="stage", mininterval=0) as bar:
        for _ in range(100):
            bar.update(1)
    lines = sys.stderr.getvalue().splitlines()
    assert "\r" not in sys.stderr.getvalue() and lines[-1].startswith("stage: 100%")
    # about 100 clock readings pass: one line per LOG_LINE_SECONDS of them at most, and the last state
    assert 2 <= len(lines) <= 100 // shared.progress.LOG_LINE_SECONDS + 2, lines
