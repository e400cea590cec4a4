"""The pipeline through its command lines: fn-analyze collect -> ica -> show -> fn-train."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fn_analyze.cli import app as analyze_app
from fn_train.cli import app as train_app

runner = CliRunner()


def _ok(result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result.output


def test_collect_ica_show_train_end_to_end(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    acts, masks, out = tmp_path / "acts", tmp_path / "mask_artifacts", tmp_path / "ft"
    _ok(
        runner.invoke(
            analyze_app,
            [
                "collect",
                "--model",
                str(tiny_lm_dir),
                "--dataset",
                str(demo_dir / "data.jsonl"),
                "--out",
                str(acts),
                "--max-length",
                "64",
            ],
        )
    )
    assert (acts / "manifest.json").is_file()
    shown = _ok(
        runner.invoke(
            analyze_app,
            [
                "ica",
                "--activations",
                str(acts),
                "--n-components",
                "6",
                "--runs",
                "2",
                "--out",
                str(masks / "tiny.json"),
            ],
        )
    )
    assert "networks covering" in shown
    index = json.loads((masks / "index.json").read_text())
    assert [entry["file"] for entry in index["masks"]] == ["tiny.json"]
    table = _ok(runner.invoke(analyze_app, ["show", str(masks / "tiny.json")]))
    assert "union:" in table and "profile" in table

    _ok(
        runner.invoke(
            train_app,
            [
                "--model_name_or_path",
                str(tiny_lm_dir),
                "--dataset_name_or_path",
                str(demo_dir / "train.csv"),
                "--output_dir",
                str(out),
                "--mask-file",
                str(masks / "tiny.json"),
                "--mask-mode",
                "key",
                "--networks",
                "0,1",
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "4",
                "--max_seq_length",
                "64",
                "--validation_split",
                "0.25",
                "--eval_steps",
                "1",
                "--logging_steps",
                "1",
                "--device",
                "cpu",
            ],
        )
    )
    saved = json.loads((out / "fn_mask.json").read_text())
    assert saved["mode"] == "key" and saved["networks"] == [0, 1]
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "fn_train_config.json").read_text())["validation_split"] == 0.25


def test_user_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    result = runner.invoke(
        train_app, ["--dataset_name_or_path", "x.csv", "--output_dir", str(tmp_path / "o"), "--mask-mode", "key"]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: --mask-mode given without --mask-file; add --mask-file or drop --mask-mode"]

    result = runner.invoke(analyze_app, ["show", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: mask file") and "does not exist" in result.output


def test_both_flag_spellings_are_accepted(tmp_path: Path) -> None:
    for spelling in ("--mask_mode", "--mask-mode"):
        result = runner.invoke(
            train_app, ["--dataset-name-or-path", "x.csv", "--output-dir", str(tmp_path), spelling, "key"]
        )
        assert result.exit_code == 2 and "--mask-mode given without --mask-file" in result.output


def test_console_scripts_are_installed_and_fnsft_is_fn_train() -> None:
    import os
    import shutil
    import subprocess

    for script in ("fn-analyze", "fn-train", "fnsft"):
        assert shutil.which(script), f"{script} is not installed: pip install -e ."
    wide = {**os.environ, "COLUMNS": "250"}
    helps = [
        subprocess.run([name, "--help"], capture_output=True, text=True, check=True, env=wide).stdout
        for name in ("fn-train", "fnsft")
    ]
    same = [" ".join(text.replace("fn-train", "fnsft").split()) for text in helps]
    assert same[0] == same[1]
    assert all(flag in helps[0] for flag in ("--model_name_or_path", "--mask-file", "--max_grad_norm", "--no_peft"))


def test_an_unexpected_failure_is_one_line_naming_it_and_its_log(tmp_path: Path, monkeypatch) -> None:
    """Any exception no check anticipated: exit 1, one line (command, exception, where), the
    traceback in a log file of the temp folder; --verbose prints it too."""
    import tempfile

    import fn_analyze.report.show

    def broken(*args, **kwargs):
        raise ValueError("the library\nbroke")

    monkeypatch.setattr(fn_analyze.report.show, "show", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = runner.invoke(analyze_app, ["show", "any.json"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error: fn-analyze show failed: ValueError: the library broke (in test_cli.py:")
    logs = list(tmp_path.glob("fn-error-*.log"))
    assert len(logs) == 1 and f"full traceback in {logs[0]}; pass --verbose to print it" in lines[0]
    assert "Traceback (most recent call last)" in logs[0].read_text() and "ValueError" in logs[0].read_text()

    verbose = runner.invoke(analyze_app, ["--verbose", "show", "any.json"])
    assert verbose.exit_code == 1 and "Traceback (most recent call last)" in verbose.output
    assert verbose.output.rstrip().splitlines()[-1].startswith("error: ")


def test_learning_rate_minus_one_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    """The measured case: it used to fail in the optimizer, with a traceback, after loading."""
    import shared.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(shared.models, "load_causal_lm", no_loading)
    out = tmp_path / "o"
    result = runner.invoke(
        train_app, ["--dataset_name_or_path", "x.csv", "--output_dir", str(out), "--learning_rate", "-1"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == "error: --learning_rate must be a positive number such as 2e-4, got -1.0"
    assert not out.exists()


def _commands() -> list[tuple[object, list[str]]]:
    """Every command line with a help: fn-analyze, each of its commands, fn-train."""
    import typer

    group = typer.main.get_command(analyze_app)
    return [(analyze_app, []), *((analyze_app, [name]) for name in group.commands), (train_app, [])]


def test_help_fits_80_columns_with_every_flag_name_and_word_whole() -> None:
    """At 80 columns no line is longer, every flag name of every command is there whole, and so is
    every word of each option's help (a choice list is one word per choice); no `<bool>`, no braces."""
    import typer

    for app, path in _commands():
        output = _ok(runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}))
        command = typer.main.get_command(app)
        for name in path:
            command = command.commands[name]
        assert max(len(line) for line in output.splitlines()) <= 80, path
        assert "<bool>" not in output and "{" not in output.splitlines()[0], path
        words = set(output.replace(",", " ").split())
        for param in command.params:
            if param.param_type_name == "option":
                missing = [flag for flag in (*param.opts, *param.secondary_opts) if flag not in words]
                assert not missing, f"{path}: {missing} cut"
            assert set((param.help or "").split()) <= set(output.split()), f"{path}: help of {param.name} cut"
