"""bench/science_sweep.py end to end on a tiny model: every option and mode gives a row, the
last line names the best ratio, and a second run resumes from the files already made. Its
fn-analyze command lines run in the test's process (one start of torch instead of ten)."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fn_analyze.cli import app
from fn_analyze.record.collect import CollectConfig, collect
from tests.helpers.processes import ROOT


def _sweep_module():
    spec = importlib.util.spec_from_file_location("science_sweep", ROOT / "bench" / "science_sweep.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _in_this_process(command: list[str]) -> float:
    """The sweep's `fn_analyze` (one command line in its own process; its wall seconds), run here."""
    started = time.perf_counter()
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, f"fn-analyze {' '.join(command)}: {result.output[-3000:]}\n{result.exception!r}"
    return time.perf_counter() - started


@pytest.mark.slow  # about 30 s: 3 ica and 6 evaluate runs
def test_sweep_runs_every_option_and_mode_and_resumes(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    acts = tmp_path / "acts"
    collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=acts, model=str(tiny_lm_dir), device="cpu"))
    out = tmp_path / "sweep"
    argv = [
        "--activations", str(acts), "--dataset", str(demo_dir / "sentiment.csv"), "--model", str(tiny_lm_dir),
        "--out", str(out), "--options", "none,nopos0,aside", "--modes", "zero,mean", "--limit", "6",
        "--draws", "1", "--set-aside", "5", "--top-n", "5", "--device", "cpu", "--seed-check",
        "--", "--n-components", "3", "--runs", "1", "--splits", "0", "--keep-unstable",
    ]  # fmt: skip
    sweep = _sweep_module()
    monkeypatch.setattr(sweep, "fn_analyze", _in_this_process)
    best = sweep.main(argv)
    printed = capsys.readouterr().out
    lines = printed.strip().splitlines()
    assert re.fullmatch(r"science_sweep: ratio=(-?\d+\.\d\d|n/a)", lines[-1]), lines[-1]
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["option"], r["mode"]) for r in rows] == [
        (option, mode) for option in ("none", "nopos0", "aside") for mode in ("zero", "mean")
    ]
    for row in rows:
        assert row["networks"] > 0 and "off_layer" in row and "kept_mag" in row
        assert 0.0 <= row["acc_base"] <= 1.0  # sentiment.csv is multiple choice: accuracy is reported
        assert row["halves"] is None and 0.0 <= row["seeds"] <= 1.0  # no splits (--splits 0); a second seed
        assert re.search(rf"^{row['option']}\s+{row['mode']}\s+{row['networks']}\s", printed, re.M)
    ratios = [r["off_mag"] for r in rows if r["off_mag"] is not None]
    assert best == (max(ratios) if ratios else None)
    ica = {
        name: json.loads((out / "masks" / f"{name}.json").read_text())["source"]["ica"]
        for name in ("nopos0", "aside", "none-seed1")
    }
    assert ica["none-seed1"]["seed"] == 1
    assert ica["nopos0"]["exclude_positions"] == [0] and ica["aside"]["set_aside"]["size"] == 5
    results = json.loads((out / "eval" / "aside-mean.json").read_text())
    assert results["ablation"]["mode"] == "mean"
    # evaluate's top 5 by magnitude are the 5 neurons the ICA set aside: no network holds one.
    assert all(c["top_magnitude_held"] == 0 for c in results["conditions"])

    # A second run makes nothing again and prints the same table.
    made = {path: path.stat().st_mtime_ns for path in out.rglob("*.json") if path.name != "sweep.json"}
    made.pop(out / sweep.SETTINGS_NAME)
    assert sweep.main(argv) == best
    again = capsys.readouterr().out
    assert again.count("done before") == 3 + 3 + 6  # ica of both seeds, evaluate
    assert again.strip().splitlines()[-len(rows) - 3 :] == lines[-len(rows) - 3 :]
    assert {path: path.stat().st_mtime_ns for path in made} == made
    # Other settings are refused in the same folder.
    with pytest.raises(SystemExit, match="holds a sweep of other settings"):
        sweep.main([*argv[: argv.index("--")], "--draws", "2", *argv[argv.index("--") :]])


def test_options_joined_by_plus_combine_their_ica_flags_and_unknown_parts_are_refused(capsys) -> None:
    sweep = _sweep_module()
    args = sweep.parse_args(["--activations", "a", "--dataset", "d", "--options", "layer+aside,none"])
    assert args.options == ["layer+aside", "none"]
    assert sweep.ica_flags("layer+aside", args) == ["--scale", "layer", "--set-aside", "100"]
    assert sweep.ica_flags("none", args) == ["--set-aside", "0"]  # ica sets massive neurons aside by default
    assert sweep.ica_flags("layer", args) == ["--scale", "layer", "--set-aside", "0"]
    with pytest.raises(SystemExit):
        sweep.parse_args(["--activations", "a", "--dataset", "d", "--options", "layer+bogus"])
    assert "unknown option 'layer+bogus'" in capsys.readouterr().err
