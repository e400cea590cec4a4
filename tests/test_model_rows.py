"""The ICA with no cache: its passes run the model, and it finds what collect-then-ica finds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fn_analyze.activations import open_activations
from fn_analyze.cli import app
from fn_analyze.collect import CollectConfig, collect
from fn_analyze.config import IcaConfig
from fn_analyze.ica import run_ica
from fn_analyze.model_rows import RUN_BATCHES, model_rows
from fn_analyze.preprocess import Preprocessing
from fn_analyze.reduction import reduce
from shared.masks import load_mask_file
from tests.helpers import refused

TOKENS = 1500  # 39 of the 60 demo records
BATCH = 2  # so that the records span more than one run (RUN_BATCHES x BATCH records)


@pytest.fixture(scope="module")
def collected(tmp_path_factory, tiny_lm_dir: Path, demo_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("cache-free") / "acts"
    collect(
        CollectConfig(
            dataset=str(demo_dir / "data.jsonl"), out=out, model=str(tiny_lm_dir), max_tokens=TOKENS, batch_size=BATCH
        )
    )
    return out


def _rows(tiny_lm_dir: Path, demo_dir: Path, **options):
    config = CollectConfig(
        dataset=str(demo_dir / "data.jsonl"),
        out=Path("unused"),
        model=str(tiny_lm_dir),
        max_tokens=TOKENS,
        batch_size=BATCH,
        **options,
    )
    return model_rows(config)


def test_the_model_rows_are_the_recorded_rows(collected: Path, tiny_lm_dir: Path, demo_dir: Path) -> None:
    acts, rows = open_activations(collected), _rows(tiny_lm_dir, demo_dir)
    assert len(rows.runs) > 1  # the runs' boundaries are crossed
    assert rows.n_tokens == acts.n_tokens == TOKENS
    assert (rows.layers, rows.n_neurons, rows.model.fingerprint) == (
        acts.layers,
        acts.n_neurons,
        acts.model.fingerprint,
    )
    from fn_analyze.token_rows import shards_of

    stored = np.concatenate([block for shard in shards_of(acts) for block in shard.blocks(10_000)])
    computed = np.concatenate([block for run in rows.runs for block in run.blocks(0)])
    np.testing.assert_array_equal(computed, stored)  # the same batches, the same float16 values
    for name in ("records", "positions", "token_ids"):
        stored_meta = np.concatenate([getattr(shard, name)() for shard in shards_of(acts)])
        np.testing.assert_array_equal(np.concatenate([getattr(run, name)() for run in rows.runs]), stored_meta)


def test_the_reduction_of_the_model_rows_equals_the_cached_one(
    collected: Path, tiny_lm_dir: Path, demo_dir: Path
) -> None:
    acts, rows = open_activations(collected), _rows(tiny_lm_dir, demo_dir)
    groups = [(0, acts.n_neurons)]
    settings = dict(k=6, prep=Preprocessing(), seed=0, oversample=10, tol=1e-6, max_passes=40, splits=2)
    cached = reduce(acts, groups, **settings)
    recomputed = reduce(rows, groups, **settings)
    for cached_view, recomputed_view in zip(cached[0], recomputed[0], strict=True):
        assert recomputed_view.passes == cached_view.passes
        assert recomputed_view.n_rows == cached_view.n_rows
        np.testing.assert_allclose(recomputed_view.eigenvalues, cached_view.eigenvalues, rtol=1e-6)
        np.testing.assert_allclose(recomputed_view.maps, cached_view.maps, atol=1e-5)


def test_ica_with_a_model_and_a_dataset_writes_the_same_networks_and_no_folder(
    collected: Path, tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    settings = dict(n_components=4, runs=2, register=False)
    cached = run_ica(IcaConfig(activations=collected, out=tmp_path / "cached.json", **settings))
    settings["batch_size"] = BATCH
    data = str(demo_dir / "data.jsonl")
    live = run_ica(
        IcaConfig(model=str(tiny_lm_dir), dataset=data, max_tokens=TOKENS, out=tmp_path / "live.json", **settings)
    )
    assert [n.layers for n in live.networks] == [n.layers for n in cached.networks]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cached.json", "live.json"]  # no activations folder
    manifest = json.loads((collected / "manifest.json").read_text())
    written = load_mask_file(tmp_path / "live.json").source["activations"]
    assert written["dataset"] == manifest["dataset"]  # recorded as collect's manifest records it
    assert written["recomputed_from_model"] is True and written["n_tokens"] == TOKENS
    assert written["sample"] == manifest["sample"]


def test_the_token_sample_is_the_collected_one(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "acts"
    data = str(demo_dir / "data.jsonl")
    collect(CollectConfig(dataset=data, out=out, model=str(tiny_lm_dir), tokens_per_sequence=3, seed=5))
    config = CollectConfig(dataset=data, out=Path("unused"), model=str(tiny_lm_dir), tokens_per_sequence=3, seed=5)
    rows = model_rows(config)
    acts = open_activations(out)
    assert rows.n_tokens == acts.n_tokens
    from fn_analyze.token_rows import shards_of

    stored = np.concatenate([shard.positions() for shard in shards_of(acts)])
    np.testing.assert_array_equal(np.concatenate([run.positions() for run in rows.runs]), stored)
    assert len(rows.runs) == -(-len(rows.plan.sequences) // (RUN_BATCHES * 8))


@pytest.mark.parametrize(
    "args, fragments",
    [
        ([], ("--activations", "--model", "--dataset")),
        (["--model", "M"], ("--activations", "--model", "--dataset")),
        (["--activations", "A", "--model", "M", "--dataset", "D"], ("--activations", "--model")),
        (["--activations", "A", "--max-tokens", "9"], ("--max-tokens", "a folder holds its own tokens")),
        (["--model", "M", "--dataset", "D", "--engine", "dask"], ("--engine", "in this process")),
    ],
)
def test_the_source_is_a_folder_or_a_model_and_a_dataset(args: list[str], fragments: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, ["ica", *args])
    refused(result, *fragments)
