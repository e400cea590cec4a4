"""Run an experiment: check everything, score the base model, draw the random controls, then train
and score every run one after another, recording each as it finishes (an interrupted experiment
resumes where it stopped: runs with a record are not run again)."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fn_analyze.measure.scoring import load_eval_set
from fn_analyze.neurons.magnitude import NeuronMagnitude, stats_from_activations, stats_from_forward
from fn_train.experiment.arms import (
    NETWORKS,
    RunSpec,
    control_mask_path,
    draw_control,
    plan_runs,
    size_label,
    write_control_mask,
)
from fn_train.experiment.config import ExperimentConfig
from fn_train.experiment.measure import (
    ScoredSet,
    TrainableCount,
    measure_model,
    peak_memory_mb,
    reset_peak_memory,
)
from fn_train.experiment.report import RESULTS_NAME, report, write_report
from fn_train.load import load_masked_model
from shared import __version__
from shared.arch import find_down_projections
from shared.constants import RUN_CONFIG_NAME, RUN_MASK_NAME
from shared.device import choose_device, choose_dtype
from shared.digests import file_digest
from shared.distributed import ranks_from_env
from shared.errors import Interrupted, ParameterError, UserError
from shared.jsonio import write_json_atomic
from shared.keystone import strongest
from shared.masks import (
    MaskFile,
    NeuronSet,
    check_compatible,
    load_mask_file,
    parse_network_ids,
    select_networks,
    union,
)
from shared.models import load_causal_lm, load_tokenizer, model_info
from shared.progress import progress_log

EXPERIMENT_SCHEMA_VERSION = 1
RUNS_FOLDER = "runs"
LOCK_NAME = ".experiment.lock"
# What may change when an experiment is started again in its folder: runs are added (an arm, a control,
# a seed) or left out of the report; every other setting is what the recorded runs were made with.
GROWABLE = frozenset({"arms", "controls", "seeds"})

say = progress_log("experiment")


@dataclass
class ExperimentPlan:
    """What an experiment runs, all checked before its first run."""

    config: ExperimentConfig
    runs: list[RunSpec]
    mask: MaskFile | None
    # Each size's neuron set (size label -> set; "" the selected networks' union), {} without a masked arm
    neurons: dict[str, NeuronSet]
    tokenizer: Any
    sets: list[ScoredSet]  # task, retention
    results: dict[str, Any]  # what an earlier, interrupted start recorded, or a new record

    def run_folder(self, run: RunSpec) -> Path:
        return self.config.out / RUNS_FOLDER / run.name

    def mask_of(self, run: RunSpec) -> tuple[Path | None, str | None]:
        """(mask file, --networks) of a run."""
        if not run.neurons:
            return None, None
        if run.neurons == NETWORKS:
            return self.config.mask_file, self.config.networks
        return control_mask_path(self.config.out, run.neurons.removeprefix("random-"), run.seed, run.size), "0"

    def train_config(self, run: RunSpec):
        mask_file, networks = self.mask_of(run)
        keystone = self.sizes[run.size] if run.neurons == NETWORKS else None  # a control's file is already its size
        return self.config.train_config(self.run_folder(run), run.arm, run.seed, mask_file, networks, keystone)

    @property
    def sizes(self) -> dict[str, int | float | None]:
        """Each keystone size by its label."""
        return {size_label(keep): keep for keep in self.config.keystone}


def plan_experiment(config: ExperimentConfig) -> ExperimentPlan:
    """Read and check everything that needs no model: the folder, the mask file and networks, every
    run's fn-train settings, both datasets."""
    if ranks_from_env().distributed:
        raise UserError(
            "fn-train experiment runs its runs one after another on one device; launch it without torchrun "
            "(or run single fn-train commands under torchrun)"
        )
    results = _earlier_results(config)
    mask, neurons = None, {}
    if config.masked_arms:
        assert config.mask_file is not None
        mask = load_mask_file(config.mask_file)
        selected = select_networks(mask, parse_network_ids(config.networks))
        neurons = {
            size_label(keep): union(selected)
            if keep is None
            else strongest(selected, keep, f"mask_file {config.mask_file}")
            for keep in config.keystone
        }
    sizes = [size_label(keep) for keep in config.keystone]
    runs = plan_runs(config.arms, config.controls, config.seeds, config.masked_arms, sizes)
    tokenizer = load_tokenizer(config.model)
    tokenizer.padding_side = "right"
    plan = ExperimentPlan(config, runs, mask, neurons, tokenizer, [], results)
    for run in runs:  # fn-train's own checks of every run's settings, before the first one starts
        try:
            plan.train_config(run)
        except ParameterError as exc:  # still naming TrainConfig's parameters: the command words them as flags
            raise ParameterError("run {run}: " + exc.template, run=run.name, **exc.values) from exc
        except UserError as exc:
            raise UserError(f"run {run.name}: {exc}") from exc
    for key, source, split, limit in (
        ("task", config.eval_data, config.eval_split, config.eval_limit),
        *((key, source, None, config.retention_limit) for key, source in retention_keys(config.retention_data)),
    ):
        eval_set = load_eval_set(source, tokenizer, split, limit=limit, max_length=config.max_seq_length)
        plan.sets.append(ScoredSet.of(key, eval_set, config.eval_batch_size, tokenizer.pad_token_id, config.generate))
    return plan


def retention_keys(sources: list[str]) -> list[tuple[str, str]]:
    """(figure prefix, source) of each retention set: `retention` for a single set, else
    `retention_<file stem>` (numbered where two stems agree)."""
    if len(sources) == 1:
        return [("retention", sources[0])]
    keys: list[tuple[str, str]] = []
    for source in sources:
        key = "retention_" + "".join(c if c.isalnum() else "_" for c in Path(source).stem)
        while key in {k for k, _ in keys}:
            key += "_2"
        keys.append((key, source))
    return keys


def _earlier_results(config: ExperimentConfig) -> dict[str, Any]:
    """The record of an interrupted start of the same experiment, or a new one; refuses a folder
    that holds something else, or an experiment with another config."""
    path = config.out / RESULTS_NAME
    if path.is_file():
        results = json.loads(path.read_text(encoding="utf-8"))
        before = results.get("config") or {}
        changed = [k for k, v in config.to_dict().items() if before.get(k) != v and k not in GROWABLE]
        if changed:
            raise UserError(
                f"out {config.out} holds an experiment run with another {changed[0]} ({before.get(changed[0])!r}); "
                "give a new out, or the config it was run with to resume it"
            )
        results["config"] = config.to_dict()
        return results
    if config.out.exists() and (not config.out.is_dir() or any(p.name != LOCK_NAME for p in config.out.iterdir())):
        raise UserError(f"out {config.out} exists and holds no {RESULTS_NAME}; give a new or empty folder")
    return {
        "schema_version": EXPERIMENT_SCHEMA_VERSION,
        "created_by": f"functional-networks {__version__}",
        "config": config.to_dict(),
        "runs": {},
    }


def _save(plan: ExperimentPlan) -> None:
    write_json_atomic(plan.config.out / RESULTS_NAME, plan.results)


def prepare(plan: ExperimentPlan, device: torch.device, dtype: torch.dtype) -> None:
    """With the base model: check the mask fits it, score it (the "before" figures), and draw the
    random controls' neuron sets (kept from an earlier start: the finished runs used them)."""
    config, results = plan.config, plan.results
    results["datasets"] = {s.key: s.describe() for s in plan.sets}
    wanted = [
        (control, seed, size)
        for control in config.controls
        for seed in config.seeds
        for size in plan.neurons
        if not control_mask_path(config.out, control, seed, size).is_file()
    ]
    if "before" in results and not wanted:
        return
    base = load_causal_lm(config.model, dtype, device)
    projections = find_down_projections(base)
    if plan.mask is not None:
        check_compatible(plan.mask, model_info(base, config.model, projections), where=f"mask_file {config.mask_file}")
    if "before" not in results:
        say.info("fn-train experiment: scoring the base model")
        results["before"] = measure_model(base, plan.tokenizer, plan.sets, config.max_new_tokens)[0]
    if wanted and plan.mask is not None:
        magnitude = _magnitude(plan, base, projections) if "magnitude" in config.controls else None
        if magnitude is not None:
            results["magnitude_source"] = magnitude.source
        for control, seed, size in wanted:
            matched = f"networks {config.networks or 'all'} of {config.mask_file}" + (
                f", {size} by |z|" if size else ""
            )
            drawn = draw_control(plan.mask, plan.neurons[size], control, seed, magnitude, config.bin_width)
            path = control_mask_path(config.out, control, seed, size)
            write_control_mask(plan.mask, drawn, control, seed, matched, path)
    results["control_masks"] = {
        path.stem: file_digest(path)
        for control in (config.controls if plan.mask is not None else [])
        for seed in config.seeds
        for size in plan.neurons
        for path in [control_mask_path(config.out, control, seed, size)]
    }
    _save(plan)
    del base
    gc.collect()


def _magnitude(plan: ExperimentPlan, base, projections) -> NeuronMagnitude:
    config = plan.config
    assert plan.mask is not None
    if config.activations is not None:
        return stats_from_activations(config.activations, plan.mask.model, ["max_abs"], cache=True).magnitude()
    task = plan.sets[0]
    return stats_from_forward(
        base.base_model, projections, task.batches, f"a pass over {config.eval_data}", ["max_abs"]
    ).magnitude()


def run_one(plan: ExperimentPlan, run: RunSpec, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Train one run into its folder (an unfinished one from an earlier start is started afresh) and
    score the trained model as it would be used, its mask on."""
    from fn_train.trainer import train

    folder = plan.run_folder(run)
    shutil.rmtree(folder, ignore_errors=True)
    train_config = plan.train_config(run)
    counter = TrainableCount()
    reset_peak_memory(device)
    metrics = train(train_config, callbacks=[counter])
    peak, _ = peak_memory_mb(device)
    with load_masked_model(folder, dtype, str(device)) as model:
        after, rows = measure_model(model, plan.tokenizer, plan.sets, plan.config.max_new_tokens)
    del model
    gc.collect()
    record_path = folder / RUN_MASK_NAME
    fn_mask = None
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        fn_mask = {
            "file_digest": file_digest(record_path),
            "digest": record["digest"],
            "mask_file": record["mask_file"],
            "networks": record["networks"],
            "mode": record["mode"],
            "masked_neurons": record["masked_neurons"],
        }
    return {
        "arm": run.arm,
        "neurons": run.neurons,
        "size": run.size,
        "seed": run.seed,
        "group": run.group,
        "figures": {
            **after,
            "train_loss": metrics.get("train_loss"),
            "train_seconds": metrics["train_runtime"],
            "trainable_parameters": counter.count,
            "peak_memory_mb": peak,
        },
        "rows": rows,  # each scored row's own figures, for the comparisons paired by seed and row
        "fn_train_config": json.loads((folder / RUN_CONFIG_NAME).read_text(encoding="utf-8")),
        "fn_mask": fn_mask,
        "folder": str(folder),
    }


def run_experiment(config: ExperimentConfig, keep_runs: bool = False) -> dict[str, Any]:
    """Every run of the experiment, one after another; returns the results (also in out/results.json,
    with the table in out/table.txt and the figure in out/results.png)."""
    started = time.perf_counter()
    plan = plan_experiment(config)
    device = choose_device(config.device)
    dtype = choose_dtype("auto", device.type)
    config.out.mkdir(parents=True, exist_ok=True)
    with _held(config.out):
        _save(plan)  # first into the folder: it marks it as this experiment's
        return _run_all(plan, device, dtype, keep_runs, started)


@contextlib.contextmanager
def _held(out: Path) -> Iterator[None]:
    """The folder's lock for the experiment's life: a second start on the same folder (which would
    train into the first one's run folders) is refused; the kernel drops the lock when the process ends."""
    with (out / LOCK_NAME).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"out {out} is in use by another fn-train experiment; wait for it to end, or give another out"
            ) from None
        yield


def _run_all(
    plan: ExperimentPlan, device: torch.device, dtype: torch.dtype, keep_runs: bool, started: float
) -> dict[str, Any]:
    config = plan.config
    prepare(plan, device, dtype)
    plan.results["peak_memory"] = peak_memory_mb(device)[1]
    done = plan.results["runs"]
    todo = [run for run in plan.runs if run.name not in done]
    if len(todo) < len(plan.runs):
        say.info(f"fn-train experiment: resuming: {len(plan.runs) - len(todo)} of {len(plan.runs)} runs are finished")
    for index, run in enumerate(todo, start=1):
        say.info(f"fn-train experiment: run {index}/{len(todo)}: {run.name}")
        try:
            record = run_one(plan, run, device, dtype)
        except Interrupted as exc:
            raise Interrupted(
                f"fn-train experiment stopped during run {run.name}; {len(done)} runs are recorded in "
                f"{config.out / RESULTS_NAME}: re-run the same command to resume",
                exc.signal_number,
            ) from exc
        if not keep_runs:
            shutil.rmtree(plan.run_folder(run), ignore_errors=True)
            record["folder"] = None
        done[run.name] = record
        report(plan.results, plan.runs)
        _save(plan)
    plan.results["seconds_this_start"] = round(time.perf_counter() - started, 1)
    report(plan.results, plan.runs)
    _save(plan)
    if not keep_runs:
        shutil.rmtree(config.out / RUNS_FOLDER, ignore_errors=True)
    write_report(plan.results, config.out)
    return plan.results
