"""The experiment's configuration: a YAML file whose keys are ExperimentConfig's fields.

Everything is checked here without a model (values, files, the arms against the mask file), and
each run's TrainConfig is built here too, so a config that fn-train would refuse is refused before
the first run starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fn_train.config import TrainConfig
from shared.config_types import check_types, read_yaml
from shared.constants import EMBEDDED_MODEL_NAME
from shared.errors import ParameterError, UserError
from shared.keystone import parse_keep
from shared.masks import parse_network_ids
from shared.numbers import parse_numbers

T = TypeVar("T")

# Arm -> fn-train's --mask-mode (None: plain LoRA, no mask).
ARM_MODES: dict[str, str | None] = {"lora": None, "key": "key", "complement": "complement", "tune": "tune"}
CONTROLS: tuple[str, ...] = ("layer", "magnitude")  # random neurons matched per layer / per layer and magnitude bin
CORRECTIONS: tuple[str, ...] = ("holm", "bh")
# 0.05 nats of answer loss is about a 5% change of perplexity; 0.05 of accuracy, 5 points.
TARGET_DIFFERENCE: dict[str, float] = {"loss": 0.05, "accuracy": 0.05}
# fn-train settings the experiment sets itself for every run: not allowed under `train:`.
SET_BY_EXPERIMENT = frozenset(
    {
        "model_name_or_path",
        "dataset_name_or_path",
        "output_dir",
        "mask_file",
        "mask_mode",
        "networks",
        "seed",
        "max_steps",
        "learning_rate",
        "per_device_train_batch_size",
        "ablation",
        "scale_factor",
        "device",
        "max_seq_length",
        "resume_from_checkpoint",
        "ica_on_the_fly",
    }
)


@dataclass
class ExperimentConfig:
    train_data: str  # the task's training rows (any format fn-train reads)
    eval_data: str  # the task's held-out rows: answer loss and accuracy before and after
    # Datasets the fine-tuning should not change: what the model forgot. One or a list; each is reported on its
    # own. Plain text (a `text` column) is scored on every token, the cross-entropy shift of the forgetting
    # literature; multiple choice also by acc.
    retention_data: str | list[str]
    out: Path  # results.json, the table, the PNG, the random controls' mask files, the run folders
    mask_file: Path | None = None  # required by the key, complement and tune arms
    model: str = EMBEDDED_MODEL_NAME
    networks: str | int | None = None  # ids such as 0,3,5-7 or massive, or one id (default: every network of the file)
    arms: list[str] = field(default_factory=lambda: list(ARM_MODES))
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))  # each masked arm's random controls
    # Sizes of the masked arms' neuron sets (the keystone regime, shared.keystone): each a count (50) or a fraction
    # (0.001, 1%) of the selected networks' neurons, the strongest by |z|; null: all of them. Each size is its
    # own arm with its own matched controls, e.g. [0.001, 0.01, null].
    keystone: list[int | float | str | None] = field(default_factory=lambda: [None])
    # A number N means seeds 0..N-1; a list as [4, 9] or "0,2-5" (ranges include their end) names the seeds.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 30  # optimizer steps per run
    learning_rate: float = 2e-4
    batch_size: int = 4
    ablation: str = "zero"  # fn-train's default: the original tool's binary mask
    scale_factor: float | None = None  # with ablation scale
    # Magnitudes for the magnitude-matched controls: an activations folder of the model (`fn-analyze collect`);
    # default: a pass of the base model over the eval rows, as `fn-analyze evaluate` measures them.
    activations: Path | None = None
    bin_width: float = 0.1  # decades of max |activation| per magnitude bin: fn-analyze evaluate's default
    eval_split: str | None = None  # default: a held-out split of eval_data when it has one, else all rows
    eval_limit: int | None = 100  # first rows of eval_data scored (None: all)
    retention_limit: int | None = 100
    # Accuracy on short answers is greedy generation (whether the answer is contained in it): several
    # times the cost of the loss. Multiple-choice data is scored by acc without it.
    generate: bool = False
    max_new_tokens: int = 16
    eval_batch_size: int = 16
    max_seq_length: int = 512
    device: str = "auto"
    train: dict[str, Any] = field(default_factory=dict)  # any other fn-train setting, for every run (lora_r: 8)
    # The comparisons' p-values are corrected for their number: holm (Holm-Bonferroni, the family-wise error
    # rate) or bh (Benjamini-Hochberg, the false discovery rate).
    correction: str = "holm"
    # The differences a reader wants to be able to see, per kind of figure: where nothing is shown, the
    # report says how many seeds would detect this difference (80% power).
    target_difference: dict[str, float] = field(default_factory=lambda: dict(TARGET_DIFFERENCE))

    def __post_init__(self) -> None:
        check_types(self)
        self.out = Path(self.out)
        if self.mask_file is not None:
            self.mask_file = Path(self.mask_file)
        if self.activations is not None:
            self.activations = Path(self.activations)
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            if self.seeds < 1:
                raise UserError(f"seeds must be at least 1, got {self.seeds}")
            self.seeds = list(range(self.seeds))
        if isinstance(self.seeds, str):
            self.seeds = _by_key(lambda: parse_numbers(self.seeds, "seeds"))
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise UserError(f"seeds must be a number of seeds or a list of integers, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds {self.seeds} repeat a seed; list each once")
        if isinstance(self.networks, int) and not isinstance(self.networks, bool):
            self.networks = str(self.networks)  # `networks: 3` in YAML: one network, as fn-train --config reads it
        _by_key(lambda: parse_network_ids(self.networks))
        self.arms = _names("arms", self.arms, tuple(ARM_MODES))
        self.controls = _names("controls", self.controls, CONTROLS, allow_empty=True)
        self.keystone = _sizes(self.keystone)
        if self.masked_arms and self.mask_file is None:
            raise UserError(f"arm {self.masked_arms[0]} needs mask_file; add mask_file: or keep only the lora arm")
        for name in ("steps", "batch_size", "eval_batch_size", "max_new_tokens", "max_seq_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a whole number of at least 1, got {getattr(self, name)!r}")
        for name in ("eval_limit", "retention_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{name} must be a whole number of at least 1 or null (all rows), got {value!r}")
        if not (isinstance(self.bin_width, (int, float)) and math.isfinite(self.bin_width) and self.bin_width > 0):
            raise UserError(f"bin_width must be a positive number of decades such as 0.1, got {self.bin_width!r}")
        if not isinstance(self.train, dict):
            raise UserError(f"train must hold fn-train settings (name: value), not {self.train!r}")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        for key in self.train:
            if key in SET_BY_EXPERIMENT:
                raise UserError(f"train: {key} is set by the experiment itself; drop it from train: (see the keys)")
            if key not in known:
                raise UserError(f"train: unknown fn-train setting {key!r}; use the names of fn-train --help")
        for path, what in ((self.train_data, "train_data"), (self.eval_data, "eval_data")):
            _check_local(path, what)
        self.retention_data = _retention_list(self.retention_data)
        for path in self.retention_data:
            _check_local(path, "retention_data")
        if self.correction not in CORRECTIONS:
            raise UserError(f"correction {self.correction!r} is unknown; use holm or bh")
        if not isinstance(self.target_difference, dict) or set(self.target_difference) - set(TARGET_DIFFERENCE):
            raise UserError(
                f"target_difference must map loss and/or accuracy to a positive number, got {self.target_difference!r}"
            )
        for kind, value in self.target_difference.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise UserError(f"target_difference: {kind} must be a positive number such as 0.05, got {value!r}")
        self.target_difference = {**TARGET_DIFFERENCE, **self.target_difference}
        if self.mask_file is not None and not self.mask_file.is_file():
            raise UserError(f"mask_file {self.mask_file} does not exist; give a file written by `fn-analyze ica`")

    @property
    def masked_arms(self) -> list[str]:
        return [arm for arm in self.arms if ARM_MODES[arm] is not None]

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    def train_config(
        self,
        output_dir: Path,
        arm: str,
        seed: int,
        mask_file: Path | None,
        networks: str | None,
        keystone: int | float | None = None,
    ):
        """The TrainConfig of one run: the experiment's budget and data, the arm's mask (and its keystone size)."""
        mode = ARM_MODES[arm]
        masked: dict[str, Any] = dict(mask_file=mask_file, mask_mode=mode, networks=networks)
        if keystone is not None:
            masked["keystone"] = keystone
        train = self.train
        if mode == "tune":  # switches nothing off and trains its own deltas: no ablation, no LoRA settings
            train = {key: value for key, value in self.train.items() if not key.startswith("lora_")}
        else:
            masked["ablation"] = self.ablation
            if self.scale_factor is not None:
                masked["scale_factor"] = self.scale_factor
        settings: dict[str, Any] = dict(
            model_name_or_path=self.model,
            dataset_name_or_path=self.train_data,
            output_dir=output_dir,
            max_steps=self.steps,
            learning_rate=self.learning_rate,
            per_device_train_batch_size=self.batch_size,
            max_seq_length=self.max_seq_length,
            seed=seed,
            device=self.device,
            save_steps=0,  # no checkpoint: a run is short, an interrupted one starts again
            **train,
            **(masked if mode is not None else {}),
        )
        return TrainConfig(**settings)


def _by_key(parse: Callable[[], T]) -> T:
    """`parse()`, its ParameterError worded with this file's keys (`seeds`), not a command's flags."""
    try:
        return parse()
    except ParameterError as exc:
        raise UserError(str(exc)) from None


def _names(key: str, value: Any, known: tuple[str, ...], allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or (not value and not allow_empty):
        raise UserError(f"{key} must be a list of {', '.join(known)}, got {value!r}")
    for name in value:
        if name not in known:
            raise UserError(f"{key}: {name!r} is unknown; use {', '.join(known)}")
    if len(set(value)) != len(value):
        raise UserError(f"{key} {value} name one twice; list each once")
    return list(value)


def _sizes(value: Any) -> list[int | float | None]:
    """keystone as a list of sizes (a single size is a list of one), each parsed once, none repeated."""
    sizes = value if isinstance(value, list) else [value]
    if not sizes:
        raise UserError("keystone must list at least one size (null: all of the networks' neurons)")
    parsed = [None if size is None else parse_keep(size, "keystone") for size in sizes]
    if len(set(parsed)) != len(parsed):
        raise UserError(f"keystone {sizes} names one size twice; list each once")
    return parsed


def _retention_list(value: Any) -> list[str]:
    """retention_data as a list of sources: one, or several (each reported on its own)."""
    sources = [value] if isinstance(value, str) else value
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise UserError(f"retention_data must be a data file or a list of them, got {value!r}")
    if len(set(sources)) != len(sources):
        raise UserError(f"retention_data {sources} names one twice; list each once")
    return list(sources)


def _check_local(path: str, key: str) -> None:
    """A path that looks like a file (has a suffix) must exist; anything else is a dataset name."""
    if Path(path).suffix and not Path(path).exists():
        raise UserError(f"{key} {path} does not exist; give a data file or a dataset name")


def load_experiment_config(path: Path) -> ExperimentConfig:
    """The config of a YAML file; every problem one UserError line naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path} does not exist; give a YAML file (see docs/commands.md, fn-train experiment)")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise UserError(f"--config {path} must hold key: value lines (a mapping), not {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    for key in raw:
        if key not in fields:
            nearest = difflib.get_close_matches(str(key), fields, n=1)
            fix = f"did you mean {nearest[0]!r}?" if nearest else f"use one of {', '.join(fields)}"
            raise UserError(f"--config {path}: unknown key {key!r}; {fix}")
    missing = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in raw
    ]
    if missing:
        raise UserError(f"--config {path}: {missing[0]} is missing; add {missing[0]}: to the file")
    try:
        return ExperimentConfig(**raw)
    except UserError as exc:
        raise UserError(f"--config {path}: {exc}") from exc
