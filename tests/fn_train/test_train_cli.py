"""fn-train's command line: both spellings, on/off booleans, --config with flags overriding it,
one-line refusals (exit 2), output folders that are not ours, remote code only when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import fn_train.config as config_module
import fn_train.trainer as trainer_module
from fn_train.cli import app
from fn_train.config import TrainConfig
from tests.helpers.masks import MASKED, write_mask
from tests.helpers.processes import refused
from tests.helpers.tiny_models import model_with_its_own_code, tiny_model
from tests.helpers.training import train_args

runner = CliRunner()
COMMAND = typer.main.get_command(app)
REQUIRED = ["--dataset_name_or_path", "data.csv", "--output_dir", "out"]
SHORT_ROWS = ("--max_seq_length", "32")  # short training rows: fast steps


@pytest.fixture
def parsed(monkeypatch) -> list[dict]:
    """The settings each invocation hands to TrainConfig (no validation, no training)."""
    seen: list[dict] = []
    monkeypatch.setattr(config_module, "TrainConfig", lambda **settings: seen.append(settings))
    monkeypatch.setattr(trainer_module, "train", lambda config: None)
    return seen


def test_every_flag_has_both_spellings() -> None:
    for param in COMMAND.params:
        if param.param_type_name != "option" or param.name in ("help", "config"):
            continue
        for opts in (param.opts, param.secondary_opts):
            underscored = {opt for opt in opts if "_" in opt}
            assert {opt.replace("_", "-") for opt in underscored} <= set(opts), f"{param.name}: {opts}"


def test_every_boolean_turns_on_and_off_in_both_spellings(parsed) -> None:
    switches = [p for p in COMMAND.params if p.param_type_name == "option" and p.secondary_opts and p.name != "verbose"]
    assert {"use_peft", "use_4bit", "bake_mask", "ica_on_the_fly", "trust_remote_code", "merge_adapter"} <= {
        p.name for p in switches
    }
    for param in switches:
        for opts, expected in ((param.opts, True), (param.secondary_opts, False)):
            for opt in opts:
                result = runner.invoke(app, [*REQUIRED, opt])
                assert result.exit_code == 0, result.output
                assert parsed[-1][param.name] is expected, opt


def test_config_file_settings_with_flags_overriding_them(parsed, tmp_path: Path) -> None:
    settings = tmp_path / "run.yaml"
    settings.write_text(
        "model_name_or_path: smollm2-135m\n"
        "dataset-name-or-path: from_file.csv\n"  # either spelling
        "output_dir: from_file_out\n"
        "learning_rate: 3.0e-5\n"
        "num_train_epochs: 2\n"
        "no_peft: true\n"  # an off-switch as a key
        "mask-mode: complement\n"
    )
    assert runner.invoke(app, ["--config", str(settings)]).exit_code == 0
    first = parsed[-1]
    assert first["dataset_name_or_path"] == "from_file.csv" and first["output_dir"] == Path("from_file_out")
    assert first["learning_rate"] == 3e-5 and first["num_train_epochs"] == 2.0 and first["use_peft"] is False
    assert first["mask_mode"] == "complement"
    result = runner.invoke(app, ["--learning-rate", "1e-3", "--config", str(settings), "--use_peft"])
    assert result.exit_code == 0, result.output
    assert parsed[-1]["learning_rate"] == 1e-3 and parsed[-1]["use_peft"] is True  # flags win, in any order
    assert parsed[-1]["num_train_epochs"] == 2.0  # the rest still comes from the file


def test_the_saved_run_config_is_a_config_file(parsed, tmp_path: Path) -> None:
    saved = TrainConfig(dataset_name_or_path="d.csv", output_dir=tmp_path / "o", weight_decay=0.1, use_4bit=True)
    (tmp_path / "run.json").write_text(json.dumps(saved.to_dict()))
    assert runner.invoke(app, ["--config", str(tmp_path / "run.json")]).exit_code == 0
    assert TrainConfig(**parsed[-1]) == saved


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("learning_rte: 1\n", "unknown setting 'learning_rte'"),
        ("- a\n- b\n", "must hold flag: value lines"),
        ("no_peft: maybe\n", "no_peft must be true or false"),
        ("a: [\n", "is not valid YAML"),
    ],
)
def test_bad_config_files_exit_2_with_one_line(tmp_path: Path, content: str, message: str) -> None:
    settings = tmp_path / "run.yaml"
    settings.write_text(content)
    assert message in refused(runner.invoke(app, ["--config", str(settings)]))


def test_a_missing_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    assert "does not exist" in refused(runner.invoke(app, ["--config", str(tmp_path / "missing.yaml")]))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--use_4bit", "--use_8bit"], "--use_4bit and --use_8bit exclude each other; keep one of them"),
        (["--mask-mode", "key"], "--mask-mode given without --mask-file; add --mask-file or drop --mask-mode"),
        (["--bake-mask"], "--bake-mask given without --mask-file; add --mask-file or drop --bake-mask"),
        (["--use-8bit", "--no_peft"], "--use_8bit freezes the base weights in quantized form; drop --no_peft"),
        (
            ["--resume_from_checkpoint", "nowhere"],
            "--resume_from_checkpoint nowhere does not exist, not a complete",
        ),
        (["--report_to", "carrier-pigeon"], "--report_to 'carrier-pigeon' is unknown"),
        (["--learning_rate", "-1"], "--learning_rate must be a positive number such as 2e-4, got -1.0"),
        (["--learning_rate", "nan"], "--learning_rate must be a positive number"),
        (["--warmup_steps", "2.5"], "--warmup_steps must be a whole number of steps or a share of the steps in [0, 1)"),
        (["--warmup_steps", "-3"], "--warmup_steps must be a whole number of steps or a share"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be a positive number, got 0.0"),
        (["--max_steps", "0"], "--max_steps must be at least 1, or -1 to train --num_train_epochs, got 0"),
        (["--max_seq_length", "0"], "--max_seq_length must be at least 1, got 0"),
        (["--weight_decay", "-0.1"], "--weight_decay must be 0 or more, got -0.1"),
        (["--lora_dropout", "1"], "--lora_dropout must lie in [0, 1), got 1.0"),
        (["--overwrite_output_dir", "--resume_from_checkpoint", "last"], "--overwrite_output_dir removes the"),
    ],
)
def test_contradictory_or_bad_flags_exit_2_and_create_nothing(tmp_path: Path, flags: list[str], message: str) -> None:
    out = tmp_path / "out"
    data = tmp_path / "x.csv"  # a readable file: the refusal is the flag's, not the data's
    data.write_text("question,answer\nq,a\n")
    result = runner.invoke(app, ["--dataset_name_or_path", str(data), "--output_dir", str(out), *flags])
    assert refused(result).startswith(f"error: {message}")
    assert not out.exists()


def test_a_tracker_that_is_not_installed_is_refused(tmp_path: Path, monkeypatch) -> None:
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: [])
    data = tmp_path / "x.csv"  # a readable file: the refusal is the flag's, not the data's
    data.write_text("question,answer\nq,a\n")
    result = runner.invoke(
        app, ["--dataset_name_or_path", str(data), "--output_dir", str(tmp_path / "o"), "--report_to", "tensorboard"]
    )
    assert "pip install tensorboard or drop the flag" in refused(result)


def test_an_earlier_runs_output_is_refused_untouched_unless_replaced(tiny_lm_dir, demo_dir, tmp_path: Path) -> None:
    """A second run into a finished run's folder is refused; with --overwrite_output_dir the
    earlier run's checkpoints go, and only the new run's are left."""
    out = tmp_path / "ft"
    first = runner.invoke(app, train_args(tiny_lm_dir, demo_dir / "train.csv", out, *SHORT_ROWS, max_steps=2))
    assert first.exit_code == 0, first.output
    assert "checkpoint-2: the Trainer also checkpoints the last step (not a multiple of --save_steps 500)" in (
        first.output
    )
    before = sorted(p.name for p in out.iterdir())
    again = runner.invoke(app, train_args(tiny_lm_dir, demo_dir / "train.csv", out, *SHORT_ROWS))
    refused(again, "holds an earlier run's output", "add --overwrite_output_dir to replace it", progress_bars=True)
    assert sorted(p.name for p in out.iterdir()) == before
    replaced = runner.invoke(
        app, train_args(tiny_lm_dir, demo_dir / "train.csv", out, *SHORT_ROWS, "--overwrite_output_dir")
    )
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((out / "fn_train_config.json").read_text())["max_steps"] == 1


def test_an_output_folder_that_is_not_ours_is_refused_untouched(tiny_lm_dir, demo_dir, tmp_path: Path) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    result = runner.invoke(app, train_args(tiny_lm_dir, demo_dir / "train.csv", out, *SHORT_ROWS))
    assert "exists and holds chapter1.tex, which fn-train did not write" in refused(result, progress_bars=True)
    assert [p.name for p in out.iterdir()] == ["chapter1.tex"] and (out / "chapter1.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    assert "is a file" in refused(
        runner.invoke(app, train_args(tiny_lm_dir, demo_dir / "train.csv", tmp_path / "file", *SHORT_ROWS)),
        progress_bars=True,
    )


def test_a_replaced_runs_old_final_files_are_gone(tiny_lm_dir, demo_dir, tmp_path) -> None:
    out = tmp_path / "out"
    assert runner.invoke(app, train_args(tiny_lm_dir, demo_dir / "train.csv", out, *SHORT_ROWS)).exit_code == 0
    assert (out / "adapter_model.safetensors").is_file()
    again = train_args(tiny_lm_dir, demo_dir / "train.csv", out, *SHORT_ROWS, "--no_peft", "--overwrite_output_dir")
    result = runner.invoke(app, again)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # a loader must not find the old adapter
    assert json.loads((out / "fn_train_config.json").read_text())["use_peft"] is False


def test_failures_after_the_checks_leave_no_output_folder(tiny_lm_dir, demo_dir, tmp_path: Path) -> None:
    other = write_mask(tiny_model("llama", intermediate_size=192), MASKED, tmp_path / "other.json")
    for extra, message in (
        (["--mask-file", str(other)], "was made for model"),
        (["--data_format", "alpaca"], "lacks column(s) instruction, output needed by format alpaca"),
    ):
        out = tmp_path / "out"
        result = runner.invoke(app, train_args(tiny_lm_dir, demo_dir / "train.csv", out, *SHORT_ROWS, *extra))
        assert message in refused(result, progress_bars=True)
        assert not out.exists()


def test_remote_code_runs_only_when_asked(tiny_lm_dir, demo_dir, tmp_path: Path) -> None:
    model = model_with_its_own_code(tiny_lm_dir, tmp_path / "custom")
    out = tmp_path / "out"
    refusal = runner.invoke(app, train_args(model, demo_dir / "train.csv", out, *SHORT_ROWS))
    assert "ships its own Python code, which is not run by default; pass --trust-remote-code" in refused(
        refusal, progress_bars=True
    )
    assert not out.exists()
    base = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True)
    assert type(base).__name__ == "CustomLlamaForCausalLM"
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    result = runner.invoke(
        app,
        train_args(model, demo_dir / "train.csv", out, *SHORT_ROWS, "--trust_remote_code", "--mask-file", str(mask)),
    )
    assert result.exit_code == 0, result.output
    assert "neurons switched off" in result.output and (out / "adapter_model.safetensors").is_file()


def test_ica_on_the_fly_accepts_the_remote_code_model_training_accepts(tiny_lm_dir, demo_dir, tmp_path: Path) -> None:
    """With --trust_remote_code, the on-the-fly collect loads a model that ships its own code as
    training does (it once refused it: the flag was not passed on)."""
    model = model_with_its_own_code(tiny_lm_dir, tmp_path / "custom")
    out = tmp_path / "out"
    extra = ["--trust_remote_code", "--ica-on-the-fly", "--ica_components", "4", "--ica_max_tokens", "600"]
    result = runner.invoke(app, train_args(model, demo_dir, out, *extra))
    assert result.exit_code == 0, result.output
    assert (out / "fn_ica_mask.json").is_file() and (out / "adapter_model.safetensors").is_file()
