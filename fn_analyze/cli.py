"""`fn-analyze`: collect activations, find networks by ICA, look at mask files.

Each command only builds a config and calls the public function that does the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shared.cli import handle_errors, setup_logging
from shared.constants import EMBEDDED_MODEL_NAME

app = typer.Typer(
    help="Find functional networks (ICA over MLP neurons) in a language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose/--quiet", "-v", help="Log progress details.")] = False,
) -> None:
    setup_logging(verbose)


@app.command("collect")
@handle_errors("fn-analyze collect")
def collect_command(
    dataset: Annotated[str, typer.Option(help="csv/json/jsonl/parquet file or HF dataset name.")],
    out: Annotated[Path, typer.Option(help="Activations folder to write (new or empty).")],
    model: Annotated[str, typer.Option(help="HF name, local path, or the embedded model.")] = EMBEDDED_MODEL_NAME,
    split: Annotated[Optional[str], typer.Option(help="Dataset split (default: train, else the first).")] = None,
    data_format: Annotated[
        str, typer.Option(help="auto|multiple_choice|qa|alpaca|prompt_completion|prompt_response|messages|text")
    ] = "auto",
    template_format: Annotated[str, typer.Option(help="auto|chat|alpaca|plain, as fn-train renders.")] = "auto",
    layers: Annotated[Optional[str], typer.Option(help="Layers to record, e.g. 0,2:5,8 (default all).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Stop after this many tokens.")] = None,
    max_length: Annotated[int, typer.Option(help="Truncate sequences to this many tokens.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    dtype: Annotated[str, typer.Option(help="auto|float32|float16|bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda|cuda:N|mps")] = "auto",
    shard_size_mb: Annotated[int, typer.Option(help="Size of one HDF5 shard.")] = 512,
    tokens_per_sequence: Annotated[
        Optional[int], typer.Option(help="Record at most this many tokens of each sequence, drawn at random.")
    ] = None,
    token_rate: Annotated[
        Optional[float], typer.Option(help="Instead: record each token with this probability (0 < r <= 1).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the token subsampling.")] = 0,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite/--no-overwrite",
            help="Replace what --out holds (default: resume an interrupted run of the same arguments).",
        ),
    ] = False,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code/--no-trust-remote-code", help="Run Python code shipped with the model (off: refused)."
        ),
    ] = False,
) -> None:
    """Record the input of every MLP down-projection for each real token, to float16 HDF5 shards.

    Re-running the same command after an interruption continues from the finished shards.
    Under `torchrun --nproc_per_node N` each process records its share into its own shards.
    """
    params = dict(locals())
    from fn_analyze.collect import CollectConfig, collect

    collect(CollectConfig(**params))


@app.command("ica")
@handle_errors("fn-analyze ica")
def ica_command(
    activations: Annotated[Path, typer.Option(help="Folder written by `fn-analyze collect`.")],
    out: Annotated[
        Optional[Path], typer.Option(help="Mask file to write (default mask_artifacts/<model>-ica<k>-seed<s>.json).")
    ] = None,
    n_components: Annotated[
        str, typer.Option(help="Independent components (k), or auto: the k with the most stable networks.")
    ] = "20",
    threshold: Annotated[
        float, typer.Option(help="|z| a neuron needs in a map (either tail) to join its network.")
    ] = 3.0,
    percentile: Annotated[
        Optional[float], typer.Option(help="Instead of --threshold: keep neurons above this percentile of each |map|.")
    ] = None,
    standardize: Annotated[
        bool,
        typer.Option(
            "--standardize/--no-standardize", help="Scale neurons to unit variance first (off: centered only)."
        ),
    ] = False,
    scale: Annotated[
        str, typer.Option(help="none (centered only), neuron (unit variance), layer (each layer's variance equal).")
    ] = "none",
    exclude_positions: Annotated[
        Optional[str], typer.Option(help="Leave out token rows at these positions, e.g. 0 (the first token).")
    ] = None,
    exclude_token_ids: Annotated[
        Optional[str], typer.Option(help="Leave out token rows of these token ids, e.g. the special tokens'.")
    ] = None,
    clip_percentile: Annotated[
        Optional[float], typer.Option(help="Clip each neuron to its [100-P, P] percentiles (estimated on a sample).")
    ] = None,
    clip_sample_rows: Annotated[
        int, typer.Option(help="Token rows sampled (seeded) to estimate the clipping percentiles.")
    ] = 4096,
    set_aside_top: Annotated[
        int,
        typer.Option("--set-aside", help="Keep the N largest-magnitude neurons out of every network; listed apart."),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the reduction's start and of the consensus runs.")] = 0,
    runs: Annotated[int, typer.Option(help="Seeded ICA runs of the consensus, on the data and on each split.")] = 6,
    splits: Annotated[
        int, typer.Option(help="Disjoint splits of the records (index modulo N) the consensus also runs on; 0: none.")
    ] = 2,
    bootstrap: Annotated[
        bool,
        typer.Option("--bootstrap/--no-bootstrap", help="Also resample the neurons of each run but the first."),
    ] = False,
    solver: Annotated[str, typer.Option(help="picard (python-picard) or fastica (scikit-learn).")] = "picard",
    min_quality: Annotated[
        float, typer.Option(help="Cluster quality (ICASSO I_q) a network needs to be emitted.")
    ] = 0.8,
    min_share: Annotated[float, typer.Option(help="Share of the runs that must find a network.")] = 0.9,
    min_run_iou: Annotated[
        float, typer.Option(help="Median IoU of the whole data's runs' networks with the network, needed.")
    ] = 0.9,
    keep_unstable: Annotated[
        bool,
        typer.Option("--keep-unstable/--stable-only", help="Also emit the clusters below the --min-* levels."),
    ] = False,
    per_layer: Annotated[
        bool,
        typer.Option("--per-layer/--whole-model", help="One ICA per layer (n-components each) or one over all layers."),
    ] = False,
    engine: Annotated[
        str, typer.Option(help="local, or dask: the reduction's sum over shards as dask tasks.")
    ] = "local",
    dask_scheduler: Annotated[
        Optional[str], typer.Option(help="Address of a dask.distributed scheduler (with --engine dask).")
    ] = None,
    device: Annotated[
        str, typer.Option(help="Where the reduction runs: auto (CUDA if present), cpu, cuda:N.")
    ] = "auto",
    register: Annotated[
        bool, typer.Option("--register/--no-register", help="Add the file to its folder's index.json.")
    ] = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite/--no-overwrite", help="Replace an existing mask file.")
    ] = False,
) -> None:
    """Find networks by spatial ICA over all captured neurons and write a mask file."""
    params = dict(locals())
    from fn_analyze.ica import IcaConfig, run_ica

    run_ica(IcaConfig(**params))


@app.command("verify")
@handle_errors("fn-analyze verify")
def verify_command(
    activations: Annotated[Path, typer.Argument(help="Folder written by `fn-analyze collect`.")],
) -> None:
    """Read every shard of an activations folder and check it against the digest its manifest holds."""
    from fn_analyze.activations import verify_activations

    typer.echo(verify_activations(activations))


@app.command("show")
@handle_errors("fn-analyze show")
def show_command(
    mask_file: Annotated[Path, typer.Argument(help="A mask file.")],
    plot: Annotated[
        Optional[Path], typer.Option(help="Also draw each network's neurons per layer to this PNG file.")
    ] = None,
) -> None:
    """Print each network's size and how it spreads over layers."""
    from fn_analyze.show import show

    typer.echo(show(mask_file, plot))
    if plot is not None:
        typer.echo(f"plot: {plot}")


@app.command("evaluate")
@handle_errors("fn-analyze evaluate")
def evaluate_command(
    mask_file: Annotated[Path, typer.Option(help="The mask file whose networks are measured.")],
    dataset: Annotated[str, typer.Option(help="Held-out data: csv/json/jsonl/parquet file or HF dataset name.")],
    model: Annotated[str, typer.Option(help="HF name, local path, or the embedded model.")] = EMBEDDED_MODEL_NAME,
    networks: Annotated[Optional[str], typer.Option(help="Network ids, e.g. 0,3,5-7 (default all).")] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Results JSON (default runs/eval/<mask>.json); the plot goes beside it.")
    ] = None,
    split: Annotated[Optional[str], typer.Option(help="Dataset split (default validation/test, else train).")] = None,
    data_format: Annotated[
        str, typer.Option(help="auto|multiple_choice|qa|alpaca|prompt_completion|prompt_response|messages|text")
    ] = "auto",
    template_format: Annotated[str, typer.Option(help="auto|chat|alpaca|plain, as fn-train renders.")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="Evaluate the first N records.")] = 200,
    max_length: Annotated[int, typer.Option(help="Truncate records to this many tokens.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Records per forward pass.")] = 16,
    conditions_per_pass: Annotated[
        int, typer.Option(help="Masks scored together in one forward pass (each on its own copy of the batch).")
    ] = 4,
    draws: Annotated[int, typer.Option(help="Random sets per control for the union rows.")] = 5,
    network_draws: Annotated[
        int, typer.Option(help="Random sets per control for each network's own row (0: no control).")
    ] = 1,
    per_network: Annotated[
        bool,
        typer.Option("--per-network/--union-only", help="Also each network switched off on its own."),
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of the random sets.")] = 0,
    activations: Annotated[
        Optional[Path],
        typer.Option(help="Activations folder for neuron magnitudes (default: a pass over the eval data)."),
    ] = None,
    top_n: Annotated[int, typer.Option(help="Largest-magnitude neurons counted in each network.")] = 100,
    exclude_top: Annotated[
        bool,
        typer.Option("--exclude-top/--include-top", help="Leave the --top-n neurons out of every set."),
    ] = False,
    bin_width: Annotated[float, typer.Option(help="Magnitude bin width, in decades of max |activation|.")] = 0.1,
    exact_match: Annotated[
        bool,
        typer.Option("--exact-match/--no-exact-match", help="Also greedy-generate answers (slower)."),
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per answer for exact match.")] = 16,
    ablation: Annotated[
        str, typer.Option(help="What each set's neurons get: zero, mean (their mean activation), scale.")
    ] = "zero",
    scale_factor: Annotated[
        Optional[float], typer.Option(help="With --ablation scale: the factor (default 2.0).")
    ] = None,
    random_fraction: Annotated[
        Optional[float],
        typer.Option(help="Also mask this share of all neurons, drawn uniformly (--draws times), e.g. 0.15."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto|float32|float16|bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda|cuda:N|mps")] = "auto",
) -> None:
    """Measure each network switched off, the union off and kept alone, against random neuron sets
    (answer-token loss; accuracy on multiple-choice data)."""
    params = dict(locals())
    from fn_analyze.evaluate import EvaluateConfig, evaluate, format_table

    config = EvaluateConfig(**params)
    typer.echo(format_table(evaluate(config)))
    typer.echo(f"results: {config.out}\nplot: {config.plot_path}")


@app.command("compare")
@handle_errors("fn-analyze compare")
def compare_command(
    mask_a: Annotated[Path, typer.Argument(help="A mask file.")],
    mask_b: Annotated[Path, typer.Argument(help="Another mask file of the same model.")],
    out: Annotated[
        Optional[Path],
        typer.Option(help="Results JSON (default runs/compare/<a>-vs-<b>.json); the heatmap goes beside it."),
    ] = None,
) -> None:
    """IoU of every pair of networks of two mask files, best matches, and a heatmap."""
    from fn_analyze.compare import CompareConfig, compare, format_comparison

    config = CompareConfig(mask_a, mask_b, out)
    typer.echo(format_comparison(compare(config)))
    typer.echo(f"results: {config.out}\nheatmap: {config.plot_path}")


@app.command("demo-data")
@handle_errors("fn-analyze demo-data")
def demo_data_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo data files.")] = Path("demo"),
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
    n_collect: Annotated[int, typer.Option(help="Records in data.jsonl (for collect).")] = 400,
    n_train: Annotated[int, typer.Option(help="Rows in train.csv.")] = 200,
    n_eval: Annotated[int, typer.Option(help="Rows in eval.csv.")] = 100,
    n_sentiment: Annotated[int, typer.Option(help="Rows in sentiment.csv (classification, for accuracy).")] = 100,
) -> None:
    """Write the demo instruction data (facts, arithmetic, sentiment, continuation) and a
    sentiment classification set (question, choices, answer) for accuracy."""
    from fn_analyze.demo_data import write_demo_data

    paths = write_demo_data(
        out, seed=seed, n_collect=n_collect, n_train=n_train, n_eval=n_eval, n_sentiment=n_sentiment
    )
    for role, path in paths.items():
        typer.echo(f"{role}: {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
