"""Real processes: fn-train killed after a checkpoint, resumed with the same mask and stopped by
SIGTERM; a checkpoint of another mask refused;
--ica-on-the-fly computing, saving and reusing its mask."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fn_train.cli import app
from fn_train.trainer import train
from shared.errors import UserError
from tests.helpers.masks import MASKED, masked_by_layer, write_mask
from tests.helpers.processes import stop_line, subprocess_env, wait_for_file
from tests.helpers.training import assert_masked_frozen_and_open_moved, neuron_parameters, small_run, train_args

FN_TRAIN = [sys.executable, "-m", "fn_train.cli"]


def _args(model: Path, demo_dir: Path, out: Path, mask: Path, *extra: str, max_steps: int) -> list[str]:
    """fn-train's flags for the full model with networks 0 and 1 of `mask` off, weight decay on."""
    masked = ["--mask-file", str(mask), "--networks", "0,1", "--no_peft", "--weight_decay", "0.5"]
    masked += ["--learning_rate", "1e-2", "--max_seq_length", "48", "--per_device_train_batch_size", "2"]
    masked += ["--logging_steps", "1", *extra]
    return train_args(model, demo_dir / "train.csv", out, *masked, max_steps=max_steps)


@pytest.mark.slow  # about 60 s: two processes that each import torch, transformers and TRL
def test_killed_run_resumes_with_the_same_mask_then_a_sigterm_saves_a_checkpoint_that_resumes(
    tiny_lm_dir, demo_dir, tmp_path
) -> None:
    """One process killed with SIGKILL after checkpoint-10, and one that resumes it and is stopped
    by a scheduler's SIGTERM: that run ends its current step, saves checkpoint-<step> with
    fn_mask.json (no checkpoint was due: --save_steps 1000), says so in one line and exits 143. A
    checkpoint of another mask is refused; the SIGTERM's checkpoint resumes (in this process)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    out = tmp_path / "out"
    command = [*FN_TRAIN, *_args(tiny_lm_dir, demo_dir, out, mask, "--save_steps", "10", max_steps=400)]
    first = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoint-10"
    wait_for_file(checkpoint / "trainer_state.json", first)  # the Trainer writes it last
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    assert json.loads((checkpoint / "fn_mask.json").read_text())["networks"] == [0, 1]

    other = write_mask(base, {0: {0: [1, 2, 3]}, 1: {1: [5]}}, tmp_path / "other.json")
    refused = CliRunner().invoke(
        app,
        _args(tiny_lm_dir, demo_dir, out, other, "--save_steps", "10", max_steps=400)
        + ["--resume_from_checkpoint", str(checkpoint)],
    )
    assert refused.exit_code == 2, refused.output
    assert f"checkpoint {checkpoint} was trained with mask {mask} (key, networks 0,1)" in refused.output

    # The killed run's command resumed, with no checkpoint due before the SIGTERM.
    resume = _args(tiny_lm_dir, demo_dir, out, mask, "--save_steps", "1000", max_steps=400)
    env = subprocess_env(PYTHONUNBUFFERED="1")  # each step's logged loss reaches the pipe at once
    second = subprocess.Popen(
        [*FN_TRAIN, *resume, "--resume_from_checkpoint", "last"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert second.stdout is not None
    printed = []
    for line in second.stdout:  # the first logged loss after the resume: the run is in its training loop
        printed.append(line)
        if "'loss'" in line:
            break
    second.send_signal(signal.SIGTERM)
    rest, stderr = second.communicate(timeout=120)
    stdout = "".join(printed) + rest
    assert second.returncode == 143, stderr[-3000:]
    assert "neurons switched off" in stdout and f"resuming from {checkpoint}" in stdout, stdout
    line = stop_line(stderr)  # what the user reads after the data's and the libraries' warnings
    stopped = sorted(set(out.glob("checkpoint-*")) - {checkpoint})
    assert len(stopped) == 1, stopped
    step = int(stopped[0].name.split("-")[1])
    assert 10 < step < 400
    assert line == (
        f"stopped by SIGTERM: fn-train saved {stopped[0]} at the end of step {step}; "
        "re-run the same command with --resume_from_checkpoint last to continue"
    )
    state = json.loads((stopped[0] / "trainer_state.json").read_text())
    assert state["global_step"] == step
    assert min(entry["step"] for entry in state["log_history"] if "loss" in entry) == 1  # history carried over
    assert json.loads((stopped[0] / "fn_mask.json").read_text())["networks"] == [0, 1]
    assert not (out / "model.safetensors").exists()

    again = _args(tiny_lm_dir, demo_dir, out, mask, "--save_steps", "1000", max_steps=step + 2)
    resumed = CliRunner().invoke(app, [*again, "--resume_from_checkpoint", "last"])
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert f"resuming from {stopped[0]}" in resumed.output
    state = json.loads((out / f"checkpoint-{step + 2}" / "trainer_state.json").read_text())
    assert state["global_step"] == step + 2
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert_masked_frozen_and_open_moved(neuron_parameters(base), neuron_parameters(tuned), masked_by_layer([0, 1]))


def test_resume_without_the_mask_is_refused(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    out = tmp_path / "out"
    train(small_run(tiny_lm_dir, demo_dir, out, mask, max_steps=2, save_steps=2))
    with pytest.raises(UserError, match="was trained with mask .*; pass the same mask flags to resume it"):
        train(small_run(tiny_lm_dir, demo_dir, out, None, max_steps=4, resume_from_checkpoint="last"))
    unmasked = tmp_path / "unmasked"
    train(small_run(tiny_lm_dir, demo_dir, unmasked, None, max_steps=2, save_steps=2))
    with pytest.raises(UserError, match="was trained without a mask"):
        train(small_run(tiny_lm_dir, demo_dir, unmasked, mask, max_steps=4, resume_from_checkpoint="last"))


def test_ica_on_the_fly_saves_a_reusable_mask(tiny_lm_dir, demo_dir, tmp_path) -> None:
    from shared.masks import load_mask_file

    out = tmp_path / "out"
    config = small_run(
        tiny_lm_dir, demo_dir, out, None, use_peft=False, weight_decay=0.5, ica_on_the_fly=True,
        ica_components=4, ica_max_tokens=600, networks="0", save_steps=3,
    )  # fmt: skip
    train(config)
    computed = load_mask_file(out / "fn_ica_mask.json")
    assert computed.networks and computed.model.name == str(tiny_lm_dir)
    record = json.loads((out / "fn_mask.json").read_text())
    assert record["mask_file"] == str(out / "fn_ica_mask.json") and record["networks"] == [0]
    frozen = {int(layer): list(neurons) for layer, neurons in computed.networks[0].layers.items()}
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert_masked_frozen_and_open_moved(neuron_parameters(base), neuron_parameters(tuned), frozen)
    # The saved mask is a mask file like any other: a second run uses it with --mask-file.
    train(small_run(tiny_lm_dir, demo_dir, tmp_path / "again", out / "fn_ica_mask.json", networks="0", max_steps=1))
    assert json.loads((tmp_path / "again" / "fn_mask.json").read_text())["digest"] == record["digest"]
