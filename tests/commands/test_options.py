"""Commands built from config dataclasses (shared.cli.config_options): each option's flags,
help text and default come from its field, so the command line and the config cannot
disagree; --config files; messages name the flags of the tool the user runs; the
libraries' FutureWarnings only with --verbose."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from typer.testing import CliRunner

from fn_analyze.cli import app as analyze_app
from fn_analyze.config import CollectConfig, CompareConfig, EvaluateConfig, IcaConfig
from fn_train.cli import app as train_app
from fn_train.config import TrainConfig
from shared.cli import config_options, library_warnings
from shared.options import option, option_spec

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Toy:
    source: Path = option(argument=True, help="A file to read.")
    name: str = option(help="A required name.")
    out_dir: Path | None = option(None, help="Where to write.")
    max_length: int = option(8, help="Longest sequence.")
    use_cache: bool = option(True, off="no_cache", help="Keep a cache.")
    overwrite: bool = option(False, help="Replace what is there.")
    ids: list[int] = option(default_factory=list, text=True, help="Ids, e.g. 0,3.")
    k: int | str = option(5, text=True, help="A number, or auto.")
    top: int = option(0, flag="top_n", help="A field whose flag is not its name.")
    internal: int = 3  # not an option

    def __post_init__(self) -> None:
        self.ids = [int(i) for i in self.ids.split(",")] if isinstance(self.ids, str) else list(self.ids or [])
        self.k = self.k if self.k == "auto" else int(self.k)


def _toy_app(seen: list[dict[str, Any]], **build: Any) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    @config_options(Toy, **build)
    def toy(
        settings: dict[str, Any],
        verbose: Annotated[bool, typer.Option("--verbose/--quiet", help="Say more.")] = False,
    ) -> None:
        """Read a toy."""
        seen.append({**settings, "verbose": verbose})

    return app


def _options(app: typer.Typer) -> dict[str, Any]:
    return {param.name: param for param in typer.main.get_command(app).params}


def test_flags_are_the_fields_hyphenated_and_booleans_turn_off() -> None:
    params = _options(_toy_app([]))
    assert list(params) == [f.name for f in fields(Toy) if option_spec(f)] + ["verbose"]
    assert params["source"].param_type_name == "argument"
    assert params["max_length"].opts == ["--max-length"] and params["top"].opts == ["--top-n"]
    assert (params["use_cache"].opts, params["use_cache"].secondary_opts) == (["--use-cache"], ["--no-cache"])
    assert (params["overwrite"].opts, params["overwrite"].secondary_opts) == (["--overwrite"], ["--no-overwrite"])
    assert "internal" not in params and params["name"].required
    for field in fields(Toy):
        if option_spec(field):
            assert params[field.name].help == option_spec(field).help


def test_both_spellings_put_the_underscore_one_first() -> None:
    params = _options(_toy_app([], both_spellings=True))
    assert params["max_length"].opts == ["--max_length", "--max-length"]
    assert params["top"].opts == ["--top_n", "--top-n"] and params["name"].opts == ["--name"]
    assert params["use_cache"].opts == ["--use_cache", "--use-cache"]
    assert params["use_cache"].secondary_opts == ["--no_cache", "--no-cache"]
    assert params["overwrite"].opts == ["--overwrite"]
    assert params["overwrite"].secondary_opts == ["--no_overwrite", "--no-overwrite"]


def test_nothing_given_is_the_fields_defaults_and_flags_reach_the_config() -> None:
    seen: list[dict[str, Any]] = []
    app = _toy_app(seen)
    assert runner.invoke(app, ["in.txt", "--name", "a"]).exit_code == 0
    settings = {k: v for k, v in seen[-1].items() if k != "verbose"}
    assert Toy(**settings) == Toy(Path("in.txt"), "a") and seen[-1]["verbose"] is False
    args = ["in.txt", "--name", "a", "--max-length", "3", "--no-cache", "--ids", "0,3", "--k", "auto", "--top-n", "2"]
    assert runner.invoke(app, [*args, "--verbose"]).exit_code == 0
    given = Toy(**{k: v for k, v in seen[-1].items() if k != "verbose"})
    assert (given.max_length, given.use_cache, given.ids, given.k, given.top) == (3, False, [0, 3], "auto", 2)
    assert seen[-1]["verbose"] is True


def test_help_shows_each_fields_help_and_default() -> None:
    result = runner.invoke(_toy_app([]), ["--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for text in ("Longest sequence.", "[default: 8]", "--use-cache", "--no-cache", "[default: use-cache]"):
        assert text in result.output, text


def test_a_config_file_sets_defaults_that_flags_override(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    app = _toy_app(seen, both_spellings=True, config_file="toy")
    settings = tmp_path / "run.yaml"
    settings.write_text("name: from-file\nmax-length: 4\nno_cache: true\ntop_n: 7\n")
    assert runner.invoke(app, ["in.txt", "--config", str(settings)]).exit_code == 0
    first = seen[-1]
    assert (first["name"], first["max_length"], first["use_cache"], first["top"]) == ("from-file", 4, False, 7)
    assert "config" not in seen[-1]
    assert runner.invoke(app, ["in.txt", "--max_length", "9", "--config", str(settings)]).exit_code == 0
    assert seen[-1]["max_length"] == 9 and seen[-1]["top"] == 7
    settings.write_text("nmae: x\n")  # a misspelling: the nearest key is named
    result = runner.invoke(app, ["in.txt", "--config", str(settings)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --config {settings}: unknown setting 'nmae'; did you mean 'name'?"
    settings.write_text("colour: x\n")  # nothing near: the flags' names are where to look
    result = runner.invoke(app, ["in.txt", "--config", str(settings)])
    assert result.output.strip() == (
        f"error: --config {settings}: unknown setting 'colour'; use the flag names of toy --help"
    )


@dataclass
class Other:
    """A second use of Toy's command: `name` declared alike, `level` its own and required."""

    name: str = option(help="A required name.")
    level: int = option(help="A required level.")
    max_length: int = option(8, help="Longest sequence.")


def test_one_command_for_several_configs_passes_only_the_options_given(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    @config_options(Other, Toy, config_file="toy")
    def both(settings: dict[str, Any]) -> None:
        seen.append(settings)

    params = _options(app)
    assert list(params)[:4] == ["name", "level", "max_length", "source"] and "command_context" not in params
    assert params["name"].required and not params["level"].required and not params["source"].required
    assert runner.invoke(app, ["--name", "a", "--level", "2"]).exit_code == 0
    assert seen[-1] == {"name": "a", "level": 2}  # the defaults are the chosen config's to fill in
    settings = tmp_path / "run.yaml"
    settings.write_text("max_length: 8\nno_cache: true\n")
    assert runner.invoke(app, ["in.txt", "--name", "a", "--config", str(settings)]).exit_code == 0
    assert seen[-1] == {"name": "a", "source": Path("in.txt"), "max_length": 8, "use_cache": False}

    @dataclass
    class Unlike:
        max_length: int = option(9, help="Longest sequence.")

    with pytest.raises(TypeError, match="Unlike.max_length is declared unlike"):
        config_options(Toy, Unlike)(both)


def _parse(app: typer.Typer, args: list[str]) -> dict[str, Any]:
    """The values a command's options take from `args`, parsed as the command line parses them."""
    command = typer.main.get_command(app)
    if isinstance(command, typer.core.TyperGroup):
        command = command.commands[args[0]]
        args = args[1:]
    return command.make_context("test", args).params


@pytest.mark.parametrize(
    ("app", "config", "args", "required"),
    [
        (train_app, TrainConfig, ["--dataset_name_or_path", "d.csv", "--output_dir", "o"], ("d.csv", "o")),
        (analyze_app, CollectConfig, ["collect", "--dataset", "d.csv", "--out", "o"], ("d.csv", "o")),
        (analyze_app, IcaConfig, ["ica", "--activations", "a"], ("a",)),
        (analyze_app, EvaluateConfig, ["evaluate", "--mask-file", "m.json", "--dataset", "d.csv"], ("d.csv", "m.json")),
        (analyze_app, CompareConfig, ["compare", "a.json", "b.json"], ("a.json", "b.json")),
    ],
    ids=["fn-train", "collect", "ica", "evaluate", "compare"],
)
def test_each_commands_defaults_are_its_configs(app, config, args, required) -> None:
    parsed = _parse(app, args)
    options = [f.name for f in fields(config) if option_spec(f)]
    assert config(**{name: parsed[name] for name in options}) == config(*required)


def test_building_the_command_lines_imports_no_heavy_library() -> None:
    """The configs' modules stay light, so --help and a usage error come at once."""
    code = (
        "import sys, typer\n"
        "from fn_analyze.cli import app as a\nfrom fn_train.cli import app as t\n"
        "typer.main.get_command(a); typer.main.get_command(t)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'sklearn', 'h5py') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_building_every_config_imports_no_heavy_library(tmp_path: Path) -> None:
    """Each config is checked when made, against name tables its own module holds: making one (or being
    refused) imports none of the stages' libraries, so a notebook or the command line can check
    settings before anything loads."""
    mask = tmp_path / "m.json"
    mask.write_text("{}")
    code = f"""
import sys
from fn_analyze.config import (
    CollectConfig, CompareConfig, EvaluateConfig, IcaConfig, IcaParams, PruneConfig, PrunedEvalConfig, TunedEvalConfig,
)
from fn_train.config import TrainConfig
from fn_train.experiment.config import ExperimentConfig
from shared.errors import ParameterError

CollectConfig(dataset="d", out="o", layers="0,2")
IcaParams(n_components="auto", exclude_positions="0", scale="layer", solver="fastica")
IcaConfig("acts", exclude_token_ids=[1, 2], engine="dask", set_aside_top="5")
EvaluateConfig(dataset="d", mask_file="m.json", ablation="scale", keystone="1%")
TunedEvalConfig("d", "out")
PrunedEvalConfig("d", "pruned")
CompareConfig("a.json", "b.json")
PruneConfig(mask_file="m.json", keep=0.5, out="o", dataset="d")
TrainConfig(dataset_name_or_path="d", output_dir="o", mask_file="m.json", mask_mode="complement", ablation="mean")
TrainConfig(dataset_name_or_path="d", output_dir="o", mask_file="m.json", mask_mode="tune", random_neurons="layer")
ExperimentConfig(train_data="t", eval_data="e", retention_data="r", out="o", mask_file={str(mask)!r}, keystone=[50])
for bad in (dict(solver="x"), dict(scale="x"), dict(engine="x")):
    try:
        IcaParams(**bad)
    except ParameterError:
        pass
print(sorted(m for m in ("torch", "sklearn", "h5py", "transformers") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def _flags_of(command: Any) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")}


@pytest.mark.parametrize("tool", ["fn-analyze collect", "fn-train"])
def test_the_template_message_names_a_flag_of_the_tool_run(tool, tiny_lm_dir, demo_dir, tmp_path: Path) -> None:
    model = shutil.copytree(tiny_lm_dir, tmp_path / "no-chat-template")
    (model / "chat_template.jinja").unlink()
    out = str(tmp_path / "out")
    if tool == "fn-train":
        app, command = train_app, typer.main.get_command(train_app)
        args = ["--model_name_or_path", str(model), "--dataset_name_or_path", str(demo_dir / "train.csv")]
        args += ["--output_dir", out, "--template_format", "chat", "--device", "cpu"]
    else:
        app, command = analyze_app, typer.main.get_command(analyze_app).commands["collect"]
        args = ["collect", "--model", str(model), "--dataset", str(demo_dir / "data.jsonl"), "--out", out]
        args += ["--template-format", "chat", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "the tokenizer has no chat template" in result.output, result.output
    named = set(re.findall(r"--[a-z][a-z0-9_-]*", result.output))
    assert named and named <= _flags_of(command), named - _flags_of(command)


def test_library_future_warnings_only_with_verbose() -> None:
    def warn(module: str) -> None:
        warnings.warn_explicit(module, FutureWarning, "lib.py", 1, module=module)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with library_warnings(verbose=False):
            warn("transformers.training_args")
            warn("trl.trainer")
            warn("fn_train.trainer")  # ours: still shown
        with library_warnings(verbose=True):
            warn("transformers.modeling_utils")
        warn("transformers.trainer")  # after the block: shown as before it
    shown = [str(w.message) for w in caught]
    assert shown == ["fn_train.trainer", "transformers.modeling_utils", "transformers.trainer"]


def test_library_logs_and_warnings_reach_fn_analyze_only_with_verbose(monkeypatch) -> None:
    """The kernels hub's trust-check warning and bitsandbytes' kernel warning are logs of
    libraries; a library's FutureWarning during a command is theirs too: --verbose shows them."""
    import logging

    import fn_analyze.report.show
    from fn_analyze.cli import app as analyze_app
    from shared.cli import setup_logging

    def show(mask_file, plot):
        warnings.warn_explicit(
            "deprecated", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils"
        )
        return "shown"

    monkeypatch.setattr(fn_analyze.report.show, "show", show)
    for verbose, shown in ((False, 0), (True, 1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = runner.invoke(analyze_app, [*(["--verbose"] if verbose else []), "show", "m.json"])
        assert result.exit_code == 0 and "shown" in result.output, result.output
        assert len([w for w in caught if w.category is FutureWarning]) == shown
        for name in ("kernels._internals.hf_hub", "bitsandbytes.backends.cpu.ops"):
            assert logging.getLogger(name).isEnabledFor(logging.WARNING) is verbose
    setup_logging(False)
