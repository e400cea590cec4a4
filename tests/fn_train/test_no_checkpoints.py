"""`--save_steps 0` writes no checkpoint and says nothing about one; `fn-train experiment`'s runs use
it, so an experiment prints no checkpoint note for a setting its user never made."""

from __future__ import annotations

from pathlib import Path

import pytest

from fn_train.config import TrainConfig
from fn_train.experiment import runner as runner_module
from fn_train.experiment.config import ExperimentConfig
from fn_train.trainer import train
from shared.constants import CHECKPOINT_PREFIX
from shared.errors import ParameterError
from tests.fn_train.experiment.test_experiment import _settings
from tests.fn_train.experiment.test_experiment import mask_path as mask_path  # the fixture
from tests.helpers.training import small_run


def test_save_steps_zero_writes_no_checkpoint_and_no_note(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "ft"
    with caplog.at_level("INFO"):
        train(small_run(tiny_lm_dir, demo_dir, out, None, max_steps=2, save_steps=0))
    assert not list(out.glob(f"{CHECKPOINT_PREFIX}*")), sorted(p.name for p in out.iterdir())
    assert "checkpoints the last step" not in caplog.text
    with_checkpoints = tmp_path / "ft-500"  # the default still checkpoints the last step, and says so
    with caplog.at_level("INFO"):
        train(small_run(tiny_lm_dir, demo_dir, with_checkpoints, None, max_steps=2))
    assert (with_checkpoints / f"{CHECKPOINT_PREFIX}2").is_dir()
    assert "checkpoint-2: the Trainer also checkpoints the last step" in caplog.text


def test_a_negative_save_steps_is_refused() -> None:
    with pytest.raises(ParameterError, match=r"save_steps must be at least 0 \(0: no checkpoints\), got -1"):
        TrainConfig(dataset_name_or_path="x.csv", output_dir=Path("out"), save_steps=-1)


def test_every_experiment_run_asks_for_no_checkpoint(
    tiny_lm_dir: Path, demo_dir: Path, mask_path: Path, tmp_path: Path
) -> None:
    config = ExperimentConfig(**_settings(tiny_lm_dir, demo_dir, mask_path, tmp_path / "o", arms=["lora", "key"]))
    plan = runner_module.plan_experiment(config)
    assert plan.runs and {plan.train_config(run).save_steps for run in plan.runs} == {0}
