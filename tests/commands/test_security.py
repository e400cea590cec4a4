"""Security: model code runs only when asked, pickled weights cannot run code, no secret is
written or printed, and names read from a manifest cannot leave its folder."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fn_analyze.cli import app as analyze_app
from fn_train.cli import app as train_app
from tests.helpers.activations import write_activations
from tests.helpers.processes import ROOT, refused, subprocess_env
from tests.helpers.tiny_models import model_with_its_own_code

runner = CliRunner()
PACKAGES = ("shared", "fn_analyze", "fn_train")


@pytest.mark.slow  # about 15 s: two collect processes
def test_model_code_runs_only_with_trust_remote_code(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    model = model_with_its_own_code(tiny_lm_dir, tmp_path / "custom")
    marker, acts = tmp_path / "marker.txt", tmp_path / "acts"
    # HF_MODULES_CACHE: where transformers copies the model's code
    env = subprocess_env(FN_TEST_MARKER=str(marker), HF_MODULES_CACHE=str(tmp_path / "modules"))
    args = [sys.executable, "-m", "fn_analyze.cli", "collect", "--model", str(model)]
    args += ["--dataset", str(demo_dir / "data.jsonl"), "--out", str(acts), "--max-tokens", "50"]

    # stdin=DEVNULL: the refusal must not depend on a prompt nobody answers.
    done = subprocess.run(args, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    refused(done, "ships its own Python code, which is not run by default; pass --trust-remote-code")
    assert not marker.exists() and not acts.exists()

    done = subprocess.run([*args, "--trust-remote-code"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "the model's own code ran"
    assert json.loads((acts / "manifest.json").read_text())["model"]["model_type"] == "custom-llama"


def test_no_code_turns_trust_remote_code_on_by_itself() -> None:
    """Only a user's flag may set it: no `trust_remote_code=True` literal in the packages."""
    found = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                    if isinstance(node.value, ast.Constant) and node.value.value is True:
                        found.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
    assert found == []


def test_pickled_weights_that_would_run_code_are_refused(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "pickled"
    shutil.copytree(tiny_lm_dir, model)
    marker = tmp_path / "opened-by-the-pickle"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # harmless, but code all the same

    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save({**weights, "payload": Payload()}, model / "pytorch_model.bin")

    acts = tmp_path / "acts"
    result = runner.invoke(
        analyze_app, ["collect", "--model", str(model), "--dataset", str(demo_dir / "data.jsonl"), "--out", str(acts)]
    )
    refused(result, f"refusing the weights of model {str(model)!r}", "use a safetensors copy")
    assert not marker.exists() and not acts.exists()


SECRETS = {
    "HF_TOKEN": "hf_SENTINELsecretTOKEN0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_SENTINELsecretTOKEN0123456789",
    "WANDB_API_KEY": "SENTINELwandbKEY0123456789",
}


def test_tokens_in_the_environment_are_never_written_or_printed(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    acts, masks, out = tmp_path / "acts", tmp_path / "mask_artifacts", tmp_path / "ft"
    outputs = []
    for app, args in (
        (analyze_app, ["collect", "--model", str(tiny_lm_dir), "--dataset", str(demo_dir / "data.jsonl")]),
        (analyze_app, ["ica", "--activations", str(acts), "--n-components", "3", "--runs", "1"]),
        (train_app, ["--model_name_or_path", str(tiny_lm_dir), "--dataset_name_or_path", str(demo_dir / "train.csv")]),
    ):
        if app is train_app:
            args += ["--output_dir", str(out), "--mask-file", str(masks / "m.json"), "--max_steps", "1"]
            args += ["--device", "cpu", "--save_steps", "1"]  # a checkpoint too: its trainer state and args
        elif args[0] == "collect":
            args += ["--out", str(acts), "--max-tokens", "200"]
        else:
            args += ["--out", str(masks / "m.json")]
        result = runner.invoke(app, args, env=SECRETS)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    written = [path for folder in (acts, masks, out) for path in folder.rglob("*") if path.is_file()]
    assert any(path.name == "fn_train_config.json" for path in written)
    assert any(path.name == "training_args.bin" for path in written)
    for secret in set(SECRETS.values()):
        for path in written:
            assert secret.encode() not in path.read_bytes(), f"{path} holds a token from the environment"
        assert all(secret not in text for text in outputs)


@pytest.mark.parametrize("name", ["../outside.h5", "{outside}", "sub/shard-r00-00000.h5", ".."])
def test_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path: Path, name: str) -> None:
    data = np.random.default_rng(0).laplace(size=(200, 40)).astype(np.float32)
    acts = write_activations(tmp_path / "acts", data, [0, 1], 20)
    manifest = json.loads((acts / "manifest.json").read_text())
    shard = acts / manifest["shards"][0]["file"]
    outside = tmp_path / "outside.h5"
    shutil.copy(shard, outside)  # a readable shard waits outside: only the name check stops it
    (acts / "sub").mkdir()
    shutil.copy(shard, acts / "sub" / shard.name)
    manifest["shards"][0]["file"] = name.format(outside=outside)
    (acts / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "m.json"
    result = runner.invoke(analyze_app, ["ica", "--activations", str(acts), "--out", str(out), "--n-components", "2"])
    refused(result, f"names the file {name.format(outside=outside)!r}, which is not a plain file name inside")
    assert not out.exists()
