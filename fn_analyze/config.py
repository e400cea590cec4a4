"""The configurations of fn-analyze's stages, and their options: each field's default and help
text are the command line's (fn_analyze/cli.py builds the commands from them).

This module imports nothing heavy (no torch, scikit-learn or h5py), so that the command line
starts at once and a config can be made and checked before anything loads: it holds the names
the checks accept (solvers, scales, engines, ...), and the stages import them from here.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import KW_ONLY, dataclass, fields
from pathlib import Path
from typing import Any

from shared.ablation_modes import check_ablation
from shared.constants import EMBEDDED_MODEL_NAME
from shared.errors import ParameterError
from shared.keystone import parse_keep
from shared.numbers import parse_numbers
from shared.options import option

AUTO = "auto"  # `--n-components auto`: fn_analyze.networks.ica.AUTO_CANDIDATES tried, the most stable kept
# `--set-aside auto`: the "massive" neurons, whose max |activation| is at least SET_ASIDE_AUTO_RATIO
# times the median neuron's, the largest SET_ASIDE_AUTO_MAX of them. On SmolLM2-135M (demo data) 128
# neurons pass 20x, so auto is the sweep's measured 100; data without massive activations (planted
# test data, tiny random models) has none to set aside. With `--scale layer` (the keep-only recipe) auto
# sets none aside: networks that may hold the massive neurons were the ones that suffice kept alone
# (docs/science.md: kept/mag 0.50x with them, 1.33x with the 100 set aside).
SET_ASIDE_AUTO_MAX = 100
SET_ASIDE_AUTO_RATIO = 20.0

SOLVERS = ("picard", "fastica")  # the consensus's ICA solvers (fn_analyze/networks/consensus.py)
# Each solver's tolerance: Picard's is on the gradient norm, FastICA's on the change of the
# unmixing matrix; both are far below the libraries' defaults, which stop before the optimum.
TOLERANCES = {"picard": 1e-6, "fastica": 1e-8}
SCALES = (
    "none",
    "neuron",
    "layer",
)  # what the columns are scaled by before the reduction (fn_analyze/networks/preprocess.py)
ENGINES = ("local", "dask")  # what runs the reduction's sum over shards (fn_analyze/networks/reduction.py)

_DATA_FORMAT_HELP = "auto, multiple_choice, qa, alpaca, prompt_completion, prompt_response, messages or text"
_MODEL_HELP = "HF name, local path, or the embedded model."


@dataclass
class CollectConfig:
    dataset: str = option(help="csv/json/jsonl/parquet file or HF dataset name.")
    out: Path = option(help="Activations folder to write (new or empty).")
    model: str = option(EMBEDDED_MODEL_NAME, help=_MODEL_HELP)
    split: str | None = option(None, help="Dataset split (default: train, else the first).")
    data_format: str = option("auto", help=_DATA_FORMAT_HELP)
    # rendered as training renders it (see shared.data)
    template_format: str = option("auto", help="auto|chat|alpaca|plain, as fn-train renders.")
    layers: str | None = option(None, help="Layers to record, e.g. 0,2-5,8 (ranges include their end; default all).")
    max_tokens: int | None = option(None, help="Stop after this many tokens.")
    max_length: int = option(256, help="Truncate sequences to this many tokens.")
    batch_size: int = option(8, help="Sequences per forward pass.")
    dtype: str = option("auto", help="auto|float32|float16|bfloat16")
    device: str = option("auto", help="auto|cpu|cuda|cuda:N|mps")
    shard_size_mb: int = option(512, help="Size of one HDF5 shard.")
    # Token subsampling, so a large corpus fits a disk budget: at most N tokens of each
    # sequence, or each token with probability r; drawn from `seed` and the record index.
    tokens_per_sequence: int | None = option(
        None, help="Record at most this many tokens of each sequence, drawn at random."
    )
    token_rate: float | None = option(None, help="Instead: record each token with this probability (0 < r <= 1).")
    seed: int = option(0, help="Seed of the token subsampling.")
    # The first token carries the massive activations (docs/science.md): a sample may leave it out.
    skip_first_token: bool = option(False, help="Never record position 0 of a sequence.")
    overwrite: bool = option(
        False, help="Replace what --out holds (default: resume an interrupted run of the same arguments)."
    )
    trust_remote_code: bool = option(  # off: models that ship Python code are refused
        False, help="Run Python code shipped with the model (off: refused)."
    )

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("max_length", "batch_size", "shard_size_mb", "max_tokens", "tokens_per_sequence"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ParameterError("{" + name + "} must be at least 1, got {value}", value=getattr(self, name))
        if self.token_rate is not None and not 0 < self.token_rate <= 1:
            raise ParameterError("{token_rate} must lie in (0, 1], got {value}", value=self.token_rate)
        if self.token_rate is not None and self.tokens_per_sequence is not None:
            raise ParameterError("{tokens_per_sequence} and {token_rate} both subsample tokens; give only one")


@dataclass(kw_only=True)
class IcaSettings:
    """The settings of the ICA that finds networks, as given: every one is also a flag of `fn-analyze
    ica`. Keyword-only, so that a subclass's own fields come first (`IcaConfig("runs/acts")`).
    Unchecked: `IcaParams` checks them when made, `fn_analyze.networks.ica.NetworkICA` (an estimator, which
    keeps its parameters as given) when it is fitted."""

    # An integer, or "auto": the candidate k (AUTO_CANDIDATES) with the most stable networks.
    n_components: int | str = option(
        20, text=True, help="Independent components (k), or auto: the k with the most stable networks."
    )
    # Default |z| >= 3: in a pilot on SmolLM2-135M, z >= 3 networks (about 6% of neurons for 20
    # components) hurt the model 3.7x more than random neurons of the same per-layer counts.
    threshold: float = option(3.0, help="|z| a neuron needs in a map (either tail) to join its network.")
    percentile: float | None = option(
        None, help="Instead of --threshold: keep neurons above this percentile of each |map|."
    )
    standardize: bool = option(  # unit variance (the original tool; its networks hurt less than random)
        False, help="Scale neurons to unit variance first (off: centered only)."
    )
    # Preprocessing that looks for function, not magnitude (fn_analyze/networks/preprocess.py): only the set-aside of
    # massive neurons is on by default (auto, below; 0 turns it off). `--scale layer` makes masks for keeping
    # only the networks (complement).
    scale: str = option(  # neuron: what standardize sets; layer: each layer weighs the same
        "none", help="none (centered only), neuron (unit variance), layer (each layer's variance equal)."
    )
    exclude_positions: list[int] = option(  # e.g. [0]: the first token
        default_factory=list, text=True, help="Leave out token rows at these positions, e.g. 0 (the first token)."
    )
    exclude_token_ids: list[int] = option(
        default_factory=list, text=True, help="Leave out token rows of these token ids, e.g. the special tokens'."
    )
    clip_percentile: float | None = option(
        None, help="Clip each neuron to its [100-P, P] percentiles (estimated on a sample)."
    )
    clip_sample_rows: int = option(  # read as (rows x neurons) float16 in memory
        4096, help="Token rows sampled (seeded) to estimate the clipping percentiles."
    )
    # "auto" (the default, see SET_ASIDE_AUTO_MAX): the massive neurons, none with --scale layer. Setting the
    # 100 largest aside on SmolLM2-135M gave networks that, mean-ablated, cost >= 2x the extra loss of
    # magnitude-matched random sets and came back from another seed and each half of the data (docs/science.md).
    set_aside_top: int | str = option(  # scale 0, listed in source.ica.set_aside
        AUTO,
        text=True,
        flag="set_aside",
        help="Keep the N largest-magnitude neurons out of every network (listed apart); "
        "auto: up to 100 massive ones (none with --scale layer); 0: none.",
    )
    seed: int = option(0, help="Seed of the reduction's start and of the consensus runs.")
    # Consensus (fn_analyze/networks/consensus.py): `runs` ICA runs, each with its own seed, on the whole
    # data and on each of `splits` disjoint parts of the records (0: the whole data only).
    runs: int = option(6, help="Seeded ICA runs of the consensus, on the data and on each split.")
    splits: int = option(2, help="Disjoint splits of the records (index modulo N) the consensus also runs on; 0: none.")
    bootstrap: bool = option(False, help="Also resample the neurons of each run but the first.")
    solver: str = option(  # see fn_analyze/networks/consensus.py for the comparison
        "picard", help="picard (python-picard) or fastica (scikit-learn)."
    )
    # A network is emitted when its cluster is tight (ICASSO I_q) and found by most runs.
    min_quality: float = option(0.8, help="Cluster quality (ICASSO I_q) a network needs to be emitted.")
    min_share: float = option(0.9, help="Share of the runs that must find a network.")
    # ...and when its own runs agree on its neurons: the median IoU of each whole-data run's
    # network with the consensus network (a network that its own runs place differently cannot
    # come back at IoU 0.9 from another seed or machine).
    min_run_iou: float = option(0.9, help="Median IoU of the whole data's runs' networks with the network, needed.")
    keep_unstable: bool = option(  # each emitted cluster still carries its figures
        False, off="stable_only", help="Also emit the clusters below the --min-* levels."
    )
    allow_little_data: bool = option(  # the rule and its reasons: fn_analyze/networks/data_needed.py
        False,
        off="enough_data",
        help="Go on when the tokens are below the floor for the components asked (k + oversample in each "
        "part the consensus compares); the networks then follow the tokens' noise.",
    )
    max_iter: int = 5000
    tol: float | None = None  # the solver's tolerance; default TOLERANCES[solver], far below the libraries' own
    oversample: int | None = None  # extra columns of the reduction (default k, at least 10)
    reduction_tol: float = 1e-6  # the reduction stops when its top-k subspace moves less than this (sine)
    max_passes: int = option(  # each pass reads the data once; the warning that it ran out names this flag
        40, help="Most passes of the reduction's subspace iteration (it stops earlier once the subspace settles)."
    )
    per_layer: bool = option(
        False, off="whole_model", help="One ICA per layer (n-components each) or one over all layers."
    )
    engine: str = option(  # dask: see fn_analyze/networks/reduction.py
        "local", help="local, or dask: the reduction's sum over shards as dask tasks."
    )
    dask_scheduler: str | None = option(  # default: dask's local one
        None, help="Address of a dask.distributed scheduler (with --engine dask)."
    )
    device: str = option("auto", help="Where the reduction runs: auto (CUDA if present), cpu, cuda:N.")
    # Off by default: the reduction's memory is then bounded by the reduced size, whatever the token count.
    in_memory: bool = option(  # fn_analyze/networks/reduction.py: ReductionSettings.hold
        False,
        help="Hold the centered rows in memory between the reduction's passes when they fit half the "
        "available memory: faster (the passes after the first only multiply), but memory grows with the tokens.",
    )


@dataclass(kw_only=True)
class IcaParams(IcaSettings):
    """The ICA's settings, checked when made (an error names the parameter) and put in the form the
    stages read: `n_components` and `set_aside_top` an int or "auto", the lists parsed, `scale` and
    `standardize` agreeing, `tol` the solver's default when not given."""

    def __post_init__(self) -> None:
        self.n_components = _parse_components(self.n_components)
        self.exclude_positions = parse_numbers(self.exclude_positions, "exclude_positions")
        self.exclude_token_ids = parse_numbers(self.exclude_token_ids, "exclude_token_ids")
        if self.scale not in SCALES:
            raise ParameterError(
                "unknown {scale} {value!r}; use one of {known}", value=self.scale, known=", ".join(SCALES)
            )
        if self.standardize and self.scale not in ("none", "neuron"):
            raise ParameterError(
                "{standardize} is {scale} neuron; give one of {standardize} or {scale} {value}", value=self.scale
            )
        if self.standardize:
            self.scale = "neuron"
        self.standardize = self.scale == "neuron"  # the old field, recorded as before
        if self.clip_percentile is not None and not 50 < self.clip_percentile < 100:
            raise ParameterError(
                "{clip_percentile} must lie strictly between 50 and 100, got {value}", value=self.clip_percentile
            )
        if self.clip_sample_rows < 100:
            raise ParameterError("{clip_sample_rows} must be at least 100, got {value}", value=self.clip_sample_rows)
        self.set_aside_top = _parse_set_aside(self.set_aside_top)
        if self.runs < 1:
            raise ParameterError("{runs} must be at least 1, got {value}", value=self.runs)
        if self.splits < 0 or self.splits == 1:
            raise ParameterError(
                "{splits} must be 0 (the whole data only) or at least 2, got {value}", value=self.splits
            )
        if self.solver not in SOLVERS:
            raise ParameterError(
                "unknown {solver} {value!r}; use one of {known}", value=self.solver, known=", ".join(SOLVERS)
            )
        if self.tol is None:
            self.tol = TOLERANCES[self.solver]
        for name in ("min_quality", "min_share", "min_run_iou"):
            if not 0 <= getattr(self, name) <= 1:
                raise ParameterError("{" + name + "} must lie between 0 and 1, got {value}", value=getattr(self, name))
        if self.percentile is not None and not 0 < self.percentile < 100:
            raise ParameterError("{percentile} must lie strictly between 0 and 100, got {value}", value=self.percentile)
        if self.threshold <= 0:
            raise ParameterError("{threshold} must be a positive z-score, got {value}", value=self.threshold)
        if self.max_passes < 1:
            raise ParameterError("{max_passes} must be at least 1, got {value}", value=self.max_passes)
        if self.oversample is not None and self.oversample < 0:
            raise ParameterError("{oversample} must be at least 0, got {value}", value=self.oversample)
        if self.engine not in ENGINES:
            raise ParameterError(
                "unknown {engine} {value!r}; use one of {known}", value=self.engine, known=", ".join(ENGINES)
            )
        if self.in_memory and self.engine != "local":
            raise ParameterError(
                "{in_memory} keeps the rows in this process; drop it or {engine} {value}", value=self.engine
            )
        if self.dask_scheduler is not None and self.engine != "dask":
            raise ParameterError("{dask_scheduler} needs {engine} dask; add it or drop {dask_scheduler}")

    def oversample_for(self, k: int) -> int:
        """Extra columns of the reduction: as many as k (at least 10), so convergence goes as
        lambda_{2k+1} / lambda_k per pass, unless set."""
        return self.oversample if self.oversample is not None else max(10, k)


@dataclass
class IcaConfig(IcaParams):
    """`fn-analyze ica`: the ICA's settings, the activations folder it reads and the mask file it writes."""

    activations: Path | None = option(None, help="Folder written by `fn-analyze collect` (or --model and --dataset).")
    # With no cache (fn_analyze/record/model_rows.py): every pass runs the model over the data, recording what
    # collect would record with the same options, and only the reduced matrices are kept.
    model: str | None = option(None, help="Instead of --activations: run this model over --dataset on every pass.")
    dataset: str | None = option(None, help="With --model: the data, read as collect reads it.")
    max_tokens: int | None = option(None, help="With --model: stop after this many tokens.")
    tokens_per_sequence: int | None = option(
        None, help="With --model: at most this many tokens of each sequence, drawn at random."
    )
    batch_size: int = option(8, help="With --model: sequences per forward pass.")
    dtype: str = option("auto", help="With --model: auto|float32|float16|bfloat16, as collect's.")
    out: Path | None = option(  # default: mask_artifacts/<model>-ica<k>-seed<seed>.json
        None, help="Mask file to write (default mask_artifacts/<model>-ica<k>-seed<s>.json)."
    )
    register: bool = option(True, help="Add the file to its folder's index.json.")
    overwrite: bool = option(False, help="Replace an existing mask file.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.activations is None) == (self.model is None or self.dataset is None):
            raise ParameterError(
                "give {activations} (a folder written by collect), or {model} and {dataset} (no folder: each "
                "pass runs the model)"
            )
        if self.activations is not None:
            self.activations = Path(self.activations)
            recording = {"max_tokens": None, "tokens_per_sequence": None, "batch_size": 8, "dtype": "auto"}
            given = [name for name, default in recording.items() if getattr(self, name) != default]
            if given:
                raise ParameterError(
                    "{" + given[0] + "} goes with {model} and {dataset}; a folder holds its own tokens"
                )
        elif self.engine != "local":
            raise ParameterError("{engine} dask sums shards of a folder; with {model} the passes run in this process")
        if self.out is not None:
            self.out = Path(self.out)

    @property
    def params(self) -> dict[str, Any]:
        """The ICA's settings alone, as `NetworkICA` takes them."""
        return {field.name: getattr(self, field.name) for field in fields(IcaParams)}

    def recording(self) -> CollectConfig:
        """With --model: what the passes record, as `collect` with the same options would (no folder)."""
        return CollectConfig(
            dataset=str(self.dataset),
            out=Path(os.devnull),  # never written: the rows are recomputed on each pass
            model=str(self.model),
            max_tokens=self.max_tokens,
            tokens_per_sequence=self.tokens_per_sequence,
            batch_size=self.batch_size,
            dtype=self.dtype,
            device=self.device,
        )


def _parse_set_aside(value: int | str) -> int | str:
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ParameterError(
            "{set_aside_top} must be a number of neurons or auto, got {value!r}", value=value
        ) from None
    if n < 0:
        raise ParameterError("{set_aside_top} must be at least 0, got {n}", n=n)
    return n


def _parse_components(value: int | str) -> int | str:
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ParameterError("{n_components} must be an integer or auto, got {value!r}", value=value) from None
    if k < 1:
        raise ParameterError("{n_components} must be at least 1, got {k}", k=k)
    return k


@dataclass
class ScoringParams(ABC):
    """What every use of `fn-analyze evaluate` reads: the held-out data, how it is read and scored, and
    where the results go. The data and what a use measures are positional
    (`EvaluateConfig("eval.csv", "mask.json")`), the rest keyword-only. Checked when made; an error
    names the parameter."""

    dataset: str = option(help="Held-out data: csv/json/jsonl/parquet file or HF dataset name.")
    _: KW_ONLY
    out: Path | None = option(  # the figure is written beside it as .png
        None,
        help="Results JSON (default runs/eval/<mask or folder>-<data>.json); the figure goes beside it as .png.",
    )
    overwrite: bool = option(False, help="Replace an existing results file and its plot.")
    split: str | None = option(None, help="Dataset split (default validation/test, else train).")
    data_format: str = option("auto", help=_DATA_FORMAT_HELP)
    template_format: str = option("auto", help="auto|chat|alpaca|plain, as fn-train renders.")
    limit: int | None = option(200, help="Evaluate the first N records.")  # None: all
    max_length: int = option(512, help="Truncate records to this many tokens.")
    batch_size: int = option(16, help="Records per forward pass.")
    exact_match: bool = option(  # a greedy generation per condition and draw: several times the cost of the loss
        False, help="Also greedy-generate answers (slower)."
    )
    max_new_tokens: int = option(16, help="Tokens generated per answer for exact match.")
    dtype: str = option("auto", help="auto|float32|float16|bfloat16")
    device: str = option("auto", help="auto|cpu|cuda|cuda:N|mps")

    def __post_init__(self) -> None:
        if self.out is None:  # named after the data too: a run on other data must not replace this one's results
            self.out = Path("runs") / "eval" / f"{self.measured}-{Path(self.dataset).stem}.json"
        self.out = Path(self.out)
        if self.out.suffix != ".json":
            raise ParameterError(
                "{out} {value} must end in .json (the plot is written beside it as .png)", value=self.out
            )
        for name, least in (("batch_size", 1), ("max_length", 2)):
            if getattr(self, name) < least:
                raise ParameterError(
                    "{" + name + "} must be at least {least}, got {value}", least=least, value=getattr(self, name)
                )
        for name in ("limit", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ParameterError("{" + name + "} must be at least 1, got {value}", value=value)

    @property
    @abstractmethod
    def measured(self) -> str:
        """What is measured, as the default results file names it."""

    @property
    def plot_path(self) -> Path:
        """The figure, beside the results JSON."""
        assert self.out is not None
        return self.out.with_suffix(".png")


@dataclass(kw_only=True)
class ControlParams(ScoringParams):
    """The random controls of the uses that draw them: random neuron sets next to a mask file's networks,
    random prunings next to a pruned folder."""

    draws: int = option(5, help="Random sets per control for the union rows; with --pruned, random prunings.")
    seed: int = option(0, help="Seed of the random sets (or prunings).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.draws < 1:
            raise ParameterError("{draws} must be at least 1, got {value}", value=self.draws)


@dataclass
class EvaluateConfig(ControlParams):
    """`fn-analyze evaluate --mask-file`: a mask file's networks switched off and kept alone, against
    random neuron sets (`fn_analyze.measure.evaluate.evaluate`)."""

    mask_file: Path = option(help="The mask file whose networks are measured.")
    model: str = option(EMBEDDED_MODEL_NAME, help=_MODEL_HELP)
    networks: str | None = option(None, help="Network ids, e.g. 0,3,5-7, or massive (default all).")
    # The keystone regime (shared.keystone): the union's and each network's rows, and their random controls,
    # hold only the strongest neurons by |z| in the networks' maps.
    keystone: int | float | None = option(
        None,
        text=True,
        help="Only the networks' strongest neurons by |z|: a count (50) or a fraction of their neurons (0.01, 1%).",
    )
    # Masks scored in one forward pass, each on its own copy of the batch's rows (per-row masks,
    # shared.hooks.stacked_down_projections): the same losses to float rounding, in fewer, larger
    # passes. 1: one mask a pass.
    conditions_per_pass: int = option(
        4, help="Masks scored together in one forward pass (each on its own copy of the batch)."
    )
    # A network's ratio carries an interval resampling the rows and the random sets: with one set there is
    # no spread between sets to resample, and the network's rank among them says nothing. 5, as --draws:
    # the fewest with which the interval holds the sets' spread and a network can rank above every set
    # (a chance of 1 in 6 for a network no different from random neurons). Every draw is a pass over the data.
    network_draws: int = option(5, help="Random sets per control for each network's own row (0: no control).")
    per_network: bool = option(  # False: the union rows only (a sweep's table needs no more)
        True, off="union_only", help="Also each network switched off on its own."
    )
    activations: Path | None = option(
        None, help="Activations folder for neuron magnitudes (default: a pass over the eval data)."
    )
    top_n: int = option(100, help="Largest-magnitude neurons counted in each network.")
    exclude_top: bool = option(  # out of every network and random set
        False, off="include_top", help="Leave the --top-n neurons out of every set."
    )
    bin_width: float = option(  # 0.1: a factor 1.26
        0.1, help="Magnitude bin width, in decades of max |activation|."
    )
    # mean: the field's standard control. Zeroing a massive-activation neuron throws the model off its
    # distribution whatever network it is in; on the demo, zeroed networks hurt 1.1-1.7x magnitude-matched
    # random sets in every sweep row, mean-ablated ones up to 2.5x (docs/science.md).
    ablation: str = option("mean", help="What each set's neurons get: mean (their mean activation), zero, scale.")
    scale_factor: float | None = option(None, help="With --ablation scale: the factor (default 2.0).")
    random_fraction: float | None = option(  # Liu et al.: 0.15
        None, help="Also mask this share of all neurons, drawn uniformly (--draws times), e.g. 0.15."
    )

    def __post_init__(self) -> None:
        self.mask_file = Path(self.mask_file)
        super().__post_init__()
        self.scale_factor = check_ablation(self.ablation, self.scale_factor)
        if self.random_fraction is not None and not 0 < self.random_fraction < 1:
            raise ParameterError(
                "{random_fraction} must lie between 0 and 1 (e.g. 0.15), got {value}", value=self.random_fraction
            )
        if self.keystone is not None:
            self.keystone = parse_keep(self.keystone, "keystone")
        if self.activations is not None:
            self.activations = Path(self.activations)
        for name, least in (("network_draws", 0), ("conditions_per_pass", 1), ("top_n", 1)):
            if getattr(self, name) < least:
                raise ParameterError(
                    "{" + name + "} must be at least {least}, got {value}", least=least, value=getattr(self, name)
                )
        if not self.bin_width > 0:
            raise ParameterError(
                "{bin_width} must be positive (decades of magnitude), got {value}", value=self.bin_width
            )

    @property
    def measured(self) -> str:
        return self.mask_file.stem


def _path_list(given: Any, name: str, noun: str) -> list[Path]:
    """An option that takes several paths, as a list: one path is a list of one, None (the command
    line's unset option) none; a path given twice is refused, naming the option `name`."""
    paths = [Path(given)] if isinstance(given, (str, Path)) else [Path(p) for p in given or []]
    if len(set(paths)) < len(paths):
        raise ParameterError("{" + name + "} names a " + noun + " twice; give each " + noun + " once")
    return paths


@dataclass
class TunedEvalConfig(ScoringParams):
    """`fn-analyze evaluate --tuned`: what fine-tuning changed and kept, the tuned folder scored next to its
    base on the data and on a retention set (`fn_analyze.measure.tuned.evaluate_tuned`)."""

    # fn-train output folders (tune deltas, LoRA adapter or full model) or any fine-tuned model folders of one
    # base, each scored next to it (the base the folders name, else --model) and against each other. One path
    # is taken as a list of one.
    tuned: list[Path] = option(
        help="Fine-tuned folders of one base to score next to it and to each other (--tuned A B), instead of masks."
    )
    retention: str | None = option(  # e.g. a family the tuning did not train on
        None, help="With --tuned: a second dataset, of what the model should keep knowing."
    )
    model: str = option(EMBEDDED_MODEL_NAME, help=_MODEL_HELP)

    def __post_init__(self) -> None:
        self.tuned = _path_list(self.tuned, "tuned", "folder")
        if not self.tuned:
            raise ParameterError("{tuned} needs at least one folder")
        super().__post_init__()

    @property
    def measured(self) -> str:
        return "+".join(folder.name for folder in self.tuned) + "-tuned"


@dataclass
class PrunedEvalConfig(ControlParams):
    """`fn-analyze evaluate --pruned`: a folder written by `fn-analyze prune` scored next to the model it was
    pruned from (the folder names it), to random prunings of the same count per layer (`draws` of them,
    seeded by `seed`, compensated as the folder was) and to importance alone
    (`fn_analyze.prune.pruned_eval.evaluate_pruned`)."""

    pruned: Path = option(help="A pruned folder to score next to its original and random prunings.")
    # Forward passes of the original and the pruned model timed in turns on the data's largest batch
    # (fn_analyze/prune/prefill_speed.py); each is a prefill of --batch-size prompts.
    speed_rounds: int = option(7, help="Rounds of the prefill speed test (one timed pass per model each).")

    def __post_init__(self) -> None:
        self.pruned = Path(self.pruned)
        super().__post_init__()
        if self.speed_rounds < 1:
            raise ParameterError("{speed_rounds} must be at least 1, got {value}", value=self.speed_rounds)

    @property
    def measured(self) -> str:
        return f"{self.pruned.name}-pruned"


# The uses of `fn-analyze evaluate`, by the option that chooses each, and what each does (as the message
# refusing an option of another use says it).
EVALUATIONS: dict[str, tuple[type[ScoringParams], str]] = {
    "mask_file": (EvaluateConfig, "selects or measures networks"),
    "tuned": (TunedEvalConfig, "scores a fine-tuned folder"),
    "pruned": (PrunedEvalConfig, "scores a pruned folder"),
}


def evaluation_config(given: dict[str, Any]) -> ScoringParams:
    """The config of the use of `fn-analyze evaluate` that the settings `given` (by field name, the command
    line's given options) choose by naming a mask file, a tuned folder or a pruned folder. A setting of
    another use is refused, with what it does."""
    chosen = [name for name in EVALUATIONS if given.get(name) is not None]
    if len(chosen) != 1:
        raise ParameterError(
            "give {mask_file} (measure networks) or {tuned} (measure a fine-tuned folder) or {pruned} "
            "(measure a pruned folder), exactly one of them"
        )
    config = EVALUATIONS[chosen[0]][0]
    own = {field.name for field in fields(config)}
    for name in (name for name in given if name not in own):  # in the command's order: the same one each time
        does = " or ".join(what for use, what in EVALUATIONS.values() if name in {f.name for f in fields(use)})
        given_as = f"{name}=False" if given[name] is False else name  # an off-switch, as given (`--union-only`)
        raise ParameterError(f"{{{given_as}}} {does}, which {{{chosen[0]}}} does not; drop {{{given_as}}}")
    return config(**given)


@dataclass
class CompareConfig:
    mask_a: Path = option(argument=True, help="A mask file.")
    mask_b: Path = option(argument=True, help="Another mask file of the same model.")
    out: Path | None = option(  # the heatmap is written beside it as .png
        None, help="Results JSON (default runs/compare/<a>-vs-<b>.json); the heatmap goes beside it."
    )

    def __post_init__(self) -> None:
        self.mask_a, self.mask_b = Path(self.mask_a), Path(self.mask_b)
        if self.out is None:
            self.out = Path("runs") / "compare" / f"{self.mask_a.stem}-vs-{self.mask_b.stem}.json"
        self.out = Path(self.out)
        if self.out.suffix != ".json":
            raise ParameterError(
                "{out} {value} must end in .json (the heatmap is written beside it as .png)", value=self.out
            )

    @property
    def plot_path(self) -> Path:
        assert self.out is not None
        return self.out.with_suffix(".png")


@dataclass
class PruneConfig:
    mask_file: Path = option(help="The mask file whose networks are kept.")
    keep: float = option(help="Share of every layer's MLP neurons kept, e.g. 0.7 (the same in every layer).")
    out: Path = option(help="Folder for the pruned model (new or empty).")
    model: str = option(EMBEDDED_MODEL_NAME, help=_MODEL_HELP)
    networks: str | None = option(None, help="Network ids kept first, e.g. 0,3,5-7, or massive (default all).")
    # The importance needs each neuron's mean and mean square over real tokens (fn_analyze/prune/importance.py).
    activations: Path | None = option(
        None, help="Activations folder (every layer) to rank the neurons on; or give --dataset."
    )
    dataset: str | None = option(None, help="Instead: data to measure the neurons on (csv/json/jsonl/parquet/HF).")
    split: str | None = option(None, help="With --dataset: the split (default validation/test, else train).")
    data_format: str = option("auto", help=_DATA_FORMAT_HELP)
    template_format: str = option("auto", help="auto|chat|alpaca|plain, as fn-train renders.")
    limit: int | None = option(200, help="With --dataset: measure on the first N records.")
    max_length: int = option(512, help="With --dataset: truncate records to this many tokens.")
    batch_size: int = option(16, help="With --dataset: records per forward pass.")
    # On: each removed neuron's mean contribution (mean activation x its down-projection column) is added
    # to the down-projection's bias, and the neurons are ranked by the variance they carry (FLAP).
    compensate: bool = option(True, help="Fold the removed neurons' mean contribution into the down-projection bias.")
    # The control: the same count per layer, drawn uniformly (seeded), compensated alike.
    random: bool = option(False, help="Keep random neurons (the same count per layer) instead: the control.")
    seed: int = option(0, help="Seed of --random.")
    dtype: str = option("auto", help="auto|float32|float16|bfloat16 (what the pruned model is saved in).")
    device: str = option("auto", help="auto|cpu|cuda|cuda:N|mps")
    overwrite: bool = option(False, help="Replace what --out holds.")

    def __post_init__(self) -> None:
        self.mask_file, self.out = Path(self.mask_file), Path(self.out)
        if not 0 < self.keep < 1:
            raise ParameterError(
                "{keep} must lie strictly between 0 and 1 (the share of neurons kept), got {value}", value=self.keep
            )
        if self.activations is not None and self.dataset is not None:
            raise ParameterError("give {activations} or {dataset} to measure the neurons on, not both")
        if self.activations is None and self.dataset is None and self.needs_moments:
            raise ParameterError(
                "give {activations} (a folder of every layer) or {dataset} to measure the neurons on "
                "(their importance, and their means for the compensation)"
            )
        if self.activations is not None:
            self.activations = Path(self.activations)
        for name in ("max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ParameterError("{" + name + "} must be at least 1, got {value}", value=getattr(self, name))
        if self.limit is not None and self.limit < 1:
            raise ParameterError("{limit} must be at least 1, got {value}", value=self.limit)

    @property
    def needs_moments(self) -> bool:
        """Whether the neurons must be measured: to rank them, or for the means the compensation adds."""
        return self.compensate or not self.random


@dataclass
class ReportConfig:
    mask_file: Path = option(help="The mask file the page is about.")
    activations: Path | None = option(
        None, help="Activations folder (recorded on the mask's model) for the network cards; or give --dataset."
    )
    dataset: str | None = option(
        None, help="Instead: data the mask's model runs over for the cards (csv/json/jsonl/parquet/HF)."
    )
    max_tokens: int | None = option(20000, help="With --dataset: at most this many tokens.")
    networks: str | None = option(None, help="Networks carded, e.g. 0,3,5-7 or massive (default all and massive).")
    top: int = option(10, help="Most active tokens shown per network.")
    # One path is taken as a list of one; each file or folder is a section of the page, in the order given.
    evaluation: list[Path] = option(
        default_factory=list,
        help="Results JSONs of `fn-analyze evaluate` (plain, --tuned or --pruned), each with its table and figure "
        "(--evaluation A.json B.json).",
    )
    experiment: list[Path] = option(
        default_factory=list, help="Folders of `fn-train experiment`, each with its table and figure."
    )
    out: Path | None = option(None, help="The HTML file to write (default runs/report/<mask file's name>.html).")

    def __post_init__(self) -> None:
        self.mask_file = Path(self.mask_file)
        self.evaluation = _path_list(self.evaluation, "evaluation", "path")
        self.experiment = _path_list(self.experiment, "experiment", "path")
        if (self.activations is None) == (self.dataset is None):
            raise ParameterError(
                "give one of {activations} (a folder from `fn-analyze collect`) or {dataset} (data the model runs "
                "over) for the network cards"
            )
        for name in ("top", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ParameterError("{" + name + "} must be at least 1, got {value}", value=getattr(self, name))
        if self.out is None:
            self.out = Path("runs") / "report" / f"{self.mask_file.stem}.html"
        self.out = Path(self.out)
        if self.out.suffix != ".html":
            raise ParameterError("{out} {value} must end in .html", value=self.out)
