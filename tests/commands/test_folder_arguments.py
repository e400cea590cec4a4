"""Each folder argument told by kind before anything loads: a table of the kinds of path a user can
give (built in tmp_path from the marker files) against --tuned, --pruned and --activations, each
accepted or refused with exit 2 in one line that says what the path is and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fn_analyze.cli import app
from fn_train.cli import app as train_app
from shared.errors import UserError
from shared.folders import kind
from tests.helpers.processes import refused

ACCEPTED = "accepted: past the folder check"


def _copy_config(source: Path, folder: Path, **changes: object) -> None:
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _make(name: str, root: Path, base: Path) -> Path:
    """A path of kind `name` (or a variant: a model of another vocabulary, an adapter on a missing base)."""
    path = root / name.replace(" ", "-")
    if name == "missing":
        return path
    if name == "file":
        path.write_text("not a folder")
        return path
    if name == "base itself":
        return base
    path.mkdir()
    adapter = json.dumps({"base_model_name_or_path": str(base)})
    markers = {
        "other folder": {"notes.txt": "x"},
        "activations": {"manifest.json": "{}"},
        "pruned model": {"fn_prune.json": "{}"},
        "checkpoint": {"trainer_state.json": "{}", "adapter_config.json": adapter},
        "fn-train run": {"fn_train_config.json": "{}"},
        "lora adapter": {"adapter_config.json": adapter},
        "adapter on a missing base": {"adapter_config.json": json.dumps({"base_model_name_or_path": "/no/such/base"})},
    }
    for file, text in markers.get(name, {}).items():
        (path / file).write_text(text)
    if name in ("model", "pruned model", "fn-train run"):
        _copy_config(base, path)
    if name == "model of another vocabulary":
        _copy_config(base, path, vocab_size=7)
    return path


def test_kind_reads_the_marker_files(tmp_path: Path, tiny_lm_dir: Path) -> None:
    names = ["missing", "file", "empty folder", "other folder", "activations", "pruned model", "checkpoint",
             "fn-train run", "lora adapter", "model"]  # fmt: skip
    assert [kind(_make(name, tmp_path, tiny_lm_dir)) for name in names] == names


TUNED = [
    ("missing", "does not exist, not a fine-tuned run"),
    ("file", "is a file, not a fine-tuned run"),
    ("empty folder", "is an empty folder, not a fine-tuned run"),
    ("other folder", "is a folder of no kind this project reads, not a fine-tuned run"),
    ("activations", "is an activations folder, not a fine-tuned run"),
    ("base itself", "is the base model itself (--model"),
    ("model of another vocabulary", "is a model with vocab_size 7, but its base"),
    ("adapter on a missing base", "names its base /no/such/base, which cannot be loaded"),
    ("model", ACCEPTED),
    ("pruned model", ACCEPTED),
    ("checkpoint", ACCEPTED),
    ("fn-train run", ACCEPTED),
    ("lora adapter", ACCEPTED),
]

PRUNED = [
    ("missing", "--pruned {path} does not exist, not a pruned model"),
    ("file", "--pruned {path} is a file, not a pruned model"),
    ("empty folder", "is an empty folder, not a pruned model"),
    ("model", "is a model folder, not a pruned model; give a folder written by `fn-analyze prune`"),
    ("fn-train run", "is an fn-train output folder, not a pruned model"),
    ("lora adapter", "is a LoRA adapter folder, not a pruned model"),
    ("activations", "is an activations folder, not a pruned model"),
    ("pruned model", ACCEPTED),
]

ACTIVATIONS = [
    ("missing", "activations folder {path} does not exist"),
    ("file", "activations folder {path} is a file, not activations"),
    ("empty folder", "has no manifest.json"),
    ("model", "is a model folder, not activations; give a folder written by `fn-analyze collect`"),
    ("pruned model", "is a pruned model folder, not activations"),
    ("fn-train run", "is an fn-train output folder, not activations"),
]


def _passed(*_args, **_kwargs):
    raise UserError(ACCEPTED)


@pytest.mark.parametrize(("name", "said"), TUNED, ids=[name for name, _ in TUNED])
def test_tuned_folders(name: str, said: str, tmp_path: Path, tiny_lm_dir: Path, demo_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr("fn_analyze.measure.tuned.load_tokenizer", _passed)
    path = _make(name, tmp_path, tiny_lm_dir)
    out = tmp_path / "e.json"
    args = ["evaluate", "--tuned", str(path), "--model", str(tiny_lm_dir), "--dataset", str(demo_dir / "eval.csv")]
    refused(CliRunner().invoke(app, [*args, "--out", str(out)]), f"--tuned {path}" if said != ACCEPTED else "", said)
    assert not out.exists()


@pytest.mark.parametrize(("name", "said"), PRUNED, ids=[name for name, _ in PRUNED])
def test_pruned_folders(name: str, said: str, tmp_path: Path, tiny_lm_dir: Path, demo_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr("fn_analyze.prune.pruned_eval.np.load", _passed)
    path = _make(name, tmp_path, tiny_lm_dir)
    out = tmp_path / "e.json"
    args = ["evaluate", "--pruned", str(path), "--dataset", str(demo_dir / "eval.csv"), "--out", str(out)]
    refused(CliRunner().invoke(app, args), said.format(path=path))
    assert not out.exists()


@pytest.mark.parametrize(("name", "said"), ACTIVATIONS, ids=[name for name, _ in ACTIVATIONS])
def test_activations_folders(name: str, said: str, tmp_path: Path, tiny_lm_dir: Path) -> None:
    path = _make(name, tmp_path, tiny_lm_dir)
    out = tmp_path / "m.json"
    args = ["ica", "--activations", str(path), "--out", str(out), "--n-components", "3", "--runs", "1"]
    refused(CliRunner().invoke(app, args), said.format(path=path))
    assert not out.exists()


RESUME = [
    ("missing", "does not exist, not a complete checkpoint (with trainer_state.json)"),
    ("file", "is a file, not a complete checkpoint"),
    ("empty folder", "is an empty folder, not a complete checkpoint"),
    ("model", "is a model folder, not a complete checkpoint (with trainer_state.json); give a checkpoint-<step>"),
    ("fn-train run", "is an fn-train output folder, not a complete checkpoint"),
    ("checkpoint", ACCEPTED),
]


@pytest.mark.parametrize(("name", "said"), RESUME, ids=[name for name, _ in RESUME])
def test_resume_folders(name: str, said: str, tmp_path: Path, tiny_lm_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr("fn_train.trainer.parse_network_ids", _passed)  # the next step once the folder is accepted
    path = _make(name, tmp_path, tiny_lm_dir)
    out = tmp_path / "out"
    (tmp_path / "x.csv").write_text("question,answer\nq,a\n")  # readable: the refusal is the folder's
    args = ["--dataset_name_or_path", str(tmp_path / "x.csv"), "--output_dir", str(out)]
    line = refused(CliRunner().invoke(train_app, [*args, "--resume_from_checkpoint", str(path)]))
    if said == ACCEPTED:
        assert "--resume_from_checkpoint" not in line, line
    else:
        assert line.startswith(f"error: --resume_from_checkpoint {path} {said}"), line
    assert not out.exists()


MODEL = [
    ("missing", "does not exist, not a model"),
    ("file", "is a file, not a model; give a model folder (with config.json)"),
    ("empty folder", "is an empty folder, not a model"),
    ("other folder", "is a folder of no kind this project reads, not a model"),
    ("activations", "is an activations folder, not a model"),
]


@pytest.mark.parametrize("command", ["collect", "fn-train"])
@pytest.mark.parametrize(("name", "said"), MODEL, ids=[name for name, _ in MODEL])
def test_model_paths(command: str, name: str, said: str, tmp_path: Path, tiny_lm_dir: Path, demo_dir: Path) -> None:
    path = _make(name, tmp_path, tiny_lm_dir)
    out = tmp_path / "out"
    if command == "collect":
        args = ["collect", "--model", str(path), "--dataset", str(demo_dir / "data.jsonl"), "--out", str(out)]
        result = CliRunner().invoke(app, args)
    else:
        args = ["--model_name_or_path", str(path), "--dataset_name_or_path", str(demo_dir / "train.csv")]
        result = CliRunner().invoke(train_app, [*args, "--output_dir", str(out), "--device", "cpu"])
    refused(result, f"model folder {path} {said}")
    assert not out.exists()


MASK_FILE = [
    ("missing", "does not exist"),
    ("empty folder", "is an empty folder"),
    ("model", "is a model folder"),
    ("activations", "is an activations folder"),
]


@pytest.mark.parametrize(("name", "said"), MASK_FILE, ids=[name for name, _ in MASK_FILE])
def test_mask_file_paths(name: str, said: str, tmp_path: Path, tiny_lm_dir: Path) -> None:
    path = _make(name, tmp_path, tiny_lm_dir)
    refused(CliRunner().invoke(app, ["show", str(path)]), f"mask file {path} {said}; give the path of a file")
