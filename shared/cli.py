"""What the command-line layers share: logging set-up, the one handler of every failure, and
the commands built from config dataclasses (their options, --config files)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import logging
import os
import sys
import tempfile
import textwrap
import time
import traceback
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional, ParamSpec, TypeVar, Union

import typer
from typer.core import TyperCommand, TyperGroup

from shared.config_types import read_yaml, type_error
from shared.errors import Interrupted, ParameterError, UserError, library_shutdown_is_unsafe
from shared.jsonio import write_text_atomic
from shared.options import OptionSpec, flag_namer, option_spec
from shared.progress import PROGRESS, close_open_bars
from shared.threads import thread_note

P = ParamSpec("P")
R = TypeVar("R")


# Libraries whose logs are hidden unless --verbose. They log warnings about optional
# kernels and log errors just before raising them; a failure reaches the user as our one
# error line, naming the cause, so a failed run prints that line and nothing else.
QUIET_LIBRARIES = (
    "accelerate",
    "bitsandbytes",
    "datasets",
    "huggingface_hub",
    "kernels",  # its hub trust check, logged when bitsandbytes loads even with no quantization asked
    "peft",
    "transformers",
    "trl",
)


# Whether this process's command runs with --verbose: set by setup_logging, which every command
# calls first; read by handle_errors to print a traceback.
_verbose = False


def setup_logging(verbose: bool = False) -> None:
    """Our logs at INFO with --verbose, else WARNING; the libraries' logs and progress bars
    (datasets' "Generating train split", transformers' "Loading weights") only with --verbose,
    once `load_libraries` has loaded them."""
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.CRITICAL)
    if (note := thread_note()) is not None:
        logging.getLogger(__name__).info(note)


def load_libraries() -> None:
    """Import datasets and transformers and set their logs and progress bars as `setup_logging`
    chose (shown only with --verbose). A command calls it once its inputs are checked
    (`shared.early_checks`), just before its work: the imports take seconds, which a refused input
    should not wait for. (Each library resets its own logger's level when it first loads, so the
    level is set again here.)"""
    import datasets.utils.logging
    import transformers.utils.logging

    level = logging.WARNING if _verbose else logging.CRITICAL
    for library in (datasets.utils.logging, transformers.utils.logging):
        library.set_verbosity(level)  # configures the library's own handler first
        if _verbose:
            library.enable_progress_bar()
        else:
            library.disable_progress_bar()
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(level)


class _StdoutLines(logging.Handler):
    """Each record's message as one line on the stdout of the moment (a test runner may have swapped it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(record.getMessage(), file=sys.stdout, flush=True)
        except Exception:
            self.handleError(record)


@contextmanager
def progress_on_stdout() -> Iterator[None]:
    """The library's progress lines (`shared.progress`) printed on stdout for the block, as the
    command's own output, and not again as log lines; as they were after it."""
    progress = logging.getLogger(PROGRESS)
    handler = _StdoutLines()
    level, propagate = progress.level, progress.propagate
    progress.setLevel(logging.INFO)
    progress.propagate = False
    progress.addHandler(handler)
    try:
        yield
    finally:
        progress.removeHandler(handler)
        progress.setLevel(level)
        progress.propagate = propagate


@contextmanager
def library_warnings(verbose: bool) -> Iterator[None]:
    """The libraries' FutureWarnings (deprecations addressed to their callers, such as TRL,
    not to our users) only with --verbose; the filter holds for the block, not the process."""
    with warnings.catch_warnings():
        if not verbose:
            for name in QUIET_LIBRARIES:
                warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{name}(\.|$)")
        yield


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _write_traceback(exc: BaseException, command: str) -> str:
    """The full traceback in a log file of the system temp folder (the output folder may be
    gone, or be the full disk); its path, or why it could not be written."""
    path = Path(tempfile.gettempdir()) / f"fn-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        write_text_atomic(path, f"{command}\n" + "".join(traceback.format_exception(exc)))
    except OSError as write_error:
        return f"the traceback could not be written to {path} ({write_error.strerror or write_error})"
    return f"full traceback in {path}"


def handle_errors(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """The top-level handler of the command `name`: nothing reaches the user as a raw traceback.

    A UserError is one line on stderr and exit code 2; an Interrupted run one line and
    128 + the signal's number; any other exception one line naming the command, the
    exception and where it was raised, with the path of a log file holding the traceback,
    and exit code 1 (after `--verbose` set up logging, the traceback is printed too)."""

    def decorate(command: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(command)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return command(*args, **kwargs)
            except UserError as exc:
                close_open_bars()
                message = exc.as_flags() if isinstance(exc, ParameterError) else str(exc)
                typer.echo(f"error: {_one_line(message)}", err=True)
                _exit_now_if_unsafe(2)
                raise typer.Exit(code=2) from None
            except Interrupted as exc:
                close_open_bars()
                typer.echo(f"stopped by {exc.signal_name}: {_one_line(str(exc))}", err=True)
                _exit_now_if_unsafe(128 + exc.signal_number)
                raise typer.Exit(code=128 + exc.signal_number) from None
            except (typer.Exit, typer.Abort):
                raise
            except Exception as exc:
                close_open_bars()
                if _verbose:
                    traceback.print_exception(exc, file=sys.stderr)
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                what = _one_line(f"{type(exc).__name__}: {exc}")
                typer.echo(
                    f"error: {name} failed: {what} (in {Path(frame.filename).name}:{frame.lineno}); "
                    f"{_write_traceback(exc, ' '.join(sys.argv))}; pass --verbose to print it",
                    err=True,
                )
                _exit_now_if_unsafe(1)
                raise typer.Exit(code=1) from None

        return wrapper

    return decorate


def _exit_now_if_unsafe(code: int) -> None:
    """End the process with `code` without the interpreter's and libraries' shutdown when a library
    asked for it (`shared.errors.skip_library_shutdown`); the message is out already."""
    if library_shutdown_is_unsafe():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@contextmanager
def usage_errors_in_one_line() -> Iterator[None]:
    """Click's usage errors (a flag's value of the wrong type, an unknown or missing option or command)
    as every other refusal of the commands: one line on stderr and exit code 2, instead of click's
    usage block, hint and error line."""
    try:
        yield
    except typer.TyperException as exc:
        if not hasattr(exc, "format_message"):  # not one of click's errors
            raise
        typer.echo(f"error: {exc.format_message()}; see --help", err=True)
        raise typer.Exit(code=2) from None


class PlainHelpCommand(TyperCommand):
    """Click's plain help instead of typer's panels, which cut flag names and choice lists at 80
    columns: every flag name and word whole (an option's names broken between names, help text
    between words), no type on on/off switches, and a usage line naming its arguments in capitals.
    Usage errors in one line (`usage_errors_in_one_line`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        with usage_errors_in_one_line():
            return super().parse_args(ctx, several_values_per_flag(self, args))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = str(param.name).upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        write_parameters(self, ctx, formatter)


def several_values_per_flag(command: Any, args: list[str]) -> list[str]:
    """`args` with the values given after one flag of an option that may be given several times
    spelled one flag each: `--tuned A B --limit 3` as `--tuned A --tuned B --limit 3`. Only for a
    command without positional arguments, where a bare word after such a value can be nothing else."""
    if any(param.param_type_name == "argument" for param in command.params):
        return args
    several = {
        flag
        for param in command.params
        if param.param_type_name == "option" and param.multiple and not param.is_flag
        for flag in param.opts
    }
    spelled: list[str] = []
    flag, waiting = None, False  # the open option's flag; whether its first value is yet to come
    for index, arg in enumerate(args):
        if arg == "--":
            return spelled + args[index:]
        if arg.startswith("-") and not waiting:
            name = arg.split("=", 1)[0]
            flag = name if name in several else None
            waiting = flag is not None and "=" not in arg
        elif waiting:
            waiting = False
        elif flag is not None:
            spelled.append(flag)
        spelled.append(arg)
    return spelled


class PlainHelpGroup(TyperGroup):
    """A command group whose help lists each command with the whole first paragraph of its help
    (click cuts it to one line, ending in "..."), and whose usage errors are one line."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        with usage_errors_in_one_line():
            return super().parse_args(ctx, args)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        with usage_errors_in_one_line():
            return super().resolve_command(ctx, args)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        write_parameters(self, ctx, formatter)
        self.format_commands(ctx, formatter)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        commands = [(name, self.commands[name]) for name in self.list_commands(ctx)]
        rows = [(name, (command.help or "").split("\n\n")[0]) for name, command in commands if not command.hidden]
        if rows:
            with formatter.section("Commands"):
                write_definitions(formatter, rows)


def write_parameters(command: Any, ctx: Any, formatter: Any) -> None:
    """The sections Arguments and Options of a command's help."""
    for title, kind in (("Arguments", "argument"), ("Options", "option")):
        records = [
            record
            for param in command.get_params(ctx)
            if param.param_type_name == kind and (record := param.get_help_record(ctx)) is not None
        ]
        if records:
            with formatter.section(title):
                write_definitions(formatter, records)


HELP_NAME_COLUMN = 30  # click's: a longer name list goes on lines of its own, the help below it


def write_definitions(formatter: Any, rows: list[tuple[str, str]]) -> None:
    """Click's definition list, but broken only between words (click breaks inside a long word
    and at hyphens): names on lines of the formatter's width, help in the column beside them."""
    indent = " " * formatter.current_indent
    width = formatter.width - formatter.current_indent
    column = min(HELP_NAME_COLUMN, max(len(name) for name, _ in rows)) + 2
    wrap = functools.partial(textwrap.wrap, break_long_words=False, break_on_hyphens=False)
    for names, help in rows:
        name_lines = wrap(names, width) or [names]
        help_lines = wrap(" ".join(help.split()), max(width - column, 10))
        if len(name_lines[-1]) > column - 2 and help_lines:
            name_lines.append("")
        for line in name_lines[:-1]:
            formatter.write(f"{indent}{line}\n")
        for i, text in enumerate(help_lines or [""]):
            first = name_lines[-1] if i == 0 else ""
            formatter.write(f"{indent}{first:<{column}}{text}".rstrip() + "\n")


def typer_app(**settings: Any) -> typer.Typer:
    """A typer app with plain help (its commands are made with `cls=PlainHelpCommand`) and one
    error handler (ours: `handle_errors`), without shell-completion options."""
    return typer.Typer(
        add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None, cls=PlainHelpGroup, **settings
    )


_CONTEXT = "command_context"  # the parameter of a command built from several configs that receives its context


def config_options(
    *configs: type, both_spellings: bool = False, config_file: str | None = None
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """A typer command whose options are the fields of a config dataclass declared with
    `shared.options.option`, in field order, then the decorated function's own options (its
    parameters after the first), then, when `config_file` names the tool, `--config FILE`.

    Flags are the fields' names hyphenated (`--max-length`); with `both_spellings`, the
    underscore spelling first and the hyphenated one beside it (`--max_length`,
    `--max-length`). A boolean is an on/off pair (`--overwrite/--no-overwrite`). The
    function gets the fields' values as a dict, its first argument, and builds the config
    from it itself: it chooses when (fn-train checks the model first) and from which module.

    One command may serve several configs (`fn-analyze evaluate`: one for each thing it measures).
    Its options are all of theirs, each once (a field that several configs have must be declared
    alike in each); a field that one config requires and another lacks is optional on the command
    line. The function then gets only the options given (on the command line or in --config): it
    chooses the config from them and can refuse an option that config lacks, and the config's own
    defaults fill in the rest."""

    def decorate(body: Callable[..., R]) -> Callable[..., R]:
        found: dict[str, tuple[dataclasses.Field, OptionSpec, Any]] = {}
        for config in configs:
            hints = typing.get_type_hints(config)
            for field in dataclasses.fields(config):
                if (spec := option_spec(field)) is None:
                    continue
                first, first_spec, _ = found.setdefault(field.name, (field, spec, hints[field.name]))
                if (first_spec, first.default, first.default_factory) != (spec, field.default, field.default_factory):
                    raise TypeError(f"{config.__name__}.{field.name} is declared unlike an earlier config's")
        # In the constructor's order: a keyword-only base's fields after the subclass's own (IcaConfig's).
        names = sorted(found, key=lambda name: found[name][0].kw_only is True)
        everywhere = set.intersection(*({field.name for field in dataclasses.fields(c)} for c in configs))
        parameters = [
            _option_parameter(*found[name], both_spellings, optional=name not in everywhere) for name in names
        ]
        own = list(inspect.signature(body, eval_str=True).parameters.values())[1:]
        parameters += [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in own]
        if config_file is not None:
            parameters.append(_config_file_parameter(config_file, {p.name: p.annotation for p in parameters}))
        if len(configs) > 1:  # typer passes the click context, which knows which options were given
            parameters.append(inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

        flag_of = flag_namer(*configs, both_spellings=both_spellings)

        @functools.wraps(body)
        def command(**values: Any) -> R:
            values.pop("config", None)  # already read: its settings arrived as the other options' values
            settings = {name: values.pop(name) for name in names}
            if len(configs) > 1:
                # By the source's name: typer ships its own copy of click from 0.26 on, whose enum is another class.
                source = values.pop(_CONTEXT).get_parameter_source
                settings = {name: value for name, value in settings.items() if source(name).name != "DEFAULT"}
            try:
                return body(settings, **values)
            except ParameterError as exc:  # worded with the parameters' names: reworded with this command's flags
                raise UserError(exc.as_flags(flag_of)) from exc

        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return command

    return decorate


def _spelled(name: str, both_spellings: bool) -> list[str]:
    """`max_length` -> [max-length], or with both spellings [max_length, max-length]."""
    hyphenated = name.replace("_", "-")
    return [name, hyphenated] if both_spellings else [hyphenated]


def _option_parameter(
    field: dataclasses.Field, spec: OptionSpec, hint: Any, both_spellings: bool, optional: bool = False
) -> inspect.Parameter:
    """The typer parameter of one config field: its flags, help text, type and default (None when
    `optional`, for a field the config requires that the command's other configs lack)."""
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = None  # a list or the like: not given on the command line unless asked for
    elif optional:
        default, hint = None, Optional[hint]
    else:
        default = inspect.Parameter.empty  # a required option
    if spec.text:
        hint = Optional[str] if default is None else str
    name = spec.flag or field.name
    if spec.argument:
        info = typer.Argument(help=spec.help)
    elif hint is bool:
        ons = dict.fromkeys(f"--{on}" for on in _spelled(name, both_spellings))
        offs = dict.fromkeys(f" /--{off}" for off in _spelled(spec.off or f"no_{name}", both_spellings))
        info = typer.Option(*ons, *offs, help=spec.help)  # " /--off": an off-switch alone (click's syntax)
    else:
        several = _list_item(hint)
        metavar = f"<{several.__name__.lower()}> ..." if several is not None else None  # one flag, several values
        flags = dict.fromkeys(f"--{flag}" for flag in _spelled(name, both_spellings))
        info = typer.Option(*flags, help=spec.help, metavar=metavar)
    return inspect.Parameter(
        field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[hint, info]
    )


def _list_item(hint: Any) -> Any:
    """The item type of a list hint (also inside Optional), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if typing.get_origin(candidate) is list:
            return typing.get_args(candidate)[0]
    return None


def _config_file_parameter(tool: str, annotations: dict[str, Any]) -> inspect.Parameter:
    """`--config FILE`: a YAML (or JSON) file of flag: value settings, read before the other
    options, whose values they become unless given on the command line too; `annotations` are
    the command's parameters' (name -> type), which the file's values are checked against."""

    def load_config(ctx: typer.Context, value: Path | None) -> Path | None:
        if value is not None:
            try:
                settings = read_config_file(value, ctx.command, tool, annotations)
                ctx.default_map = {**(ctx.default_map or {}), **settings}
            except UserError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(code=2) from None
        return value

    info = typer.Option(
        "--config",
        help="YAML file of flag: value settings; flags given here override it.",
        is_eager=True,  # runs before the other options are read, so the file's settings become their defaults
        callback=load_config,
    )
    return inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[Path], info]
    )


def _config_keys(command: Any) -> dict[str, tuple[str, bool]]:
    """Every spelling of every option, as a config-file key (`mask-file`, `mask_file`,
    `no_peft`, ...) -> (parameter name, whether the key means the value as given
    (False: an off-switch such as `no_peft: true`, which sets use_peft to false))."""
    keys: dict[str, tuple[str, bool]] = {}
    for param in command.params:
        if param.param_type_name != "option" or param.name == "config":
            continue
        for opts, as_given in ((param.opts, True), (param.secondary_opts, False)):
            for opt in opts:
                key = opt.lstrip("-")
                keys[key] = keys[key.replace("-", "_")] = (str(param.name), as_given)
    return keys


def read_config_file(path: Path, command: Any, tool: str, annotations: dict[str, Any]) -> dict[str, Any]:
    """The settings of a YAML (or JSON) file as click's defaults: flags on the command line
    override them. Keys are flag names in either spelling; each value must fit its parameter's
    annotation (`shared.config_types`), where click would print its usage and a message without
    the value. A flag read as text takes a number too (`networks: 3` is the text 3)."""
    import yaml

    if not path.is_file():
        raise UserError(f"--config {path} does not exist; give a YAML file of flag: value lines")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"--config {path} must hold flag: value lines (a mapping), not a {type(raw).__name__}")
    keys = _config_keys(command)
    defaults: dict[str, Any] = {}
    for key, value in raw.items():
        if str(key) not in keys:
            nearest = difflib.get_close_matches(str(key), list(keys), n=1)
            fix = f"did you mean {nearest[0]!r}?" if nearest else f"use the flag names of {tool} --help"
            raise UserError(f"--config {path}: unknown setting {key!r}; {fix}")
        name, as_given = keys[str(key)]
        if not as_given:
            if not isinstance(value, bool):
                raise UserError(f"--config {path}: {key} must be true or false, got {value!r}")
            value = not value
        if (error := type_error(str(key), value, _file_type(annotations[name]))) is not None:
            raise UserError(f"--config {path}: {error}")
        defaults[name] = value
    return defaults


def _file_type(annotation: Any) -> Any:
    """The type a config file's value may have for a parameter: its annotation without typer's
    `Annotated[..., typer.Option(...)]`, a number allowed where text goes (click reads it as text)."""
    hint = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return Union[(*arms, int, float)] if str in arms else hint
