"""The ICA with no cache: its passes run the model, and it finds what collect-then-ica finds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fn_analyze.cli import app
from fn_analyze.config import IcaConfig
from fn_analyze.networks.ica import run_ica
from fn_analyze.networks.preprocess import Preprocessing, RowFilter
from fn_analyze.networks.reduction import ReductionSettings, held_bytes, reduce
from fn_analyze.record.activations import open_activations
from fn_analyze.record.collect import CollectConfig, collect
from fn_analyze.record.model_rows import RUN_BATCHES, model_rows
from fn_analyze.record.token_rows import shards_of
from shared.errors import ParameterError
from shared.masks import load_mask_file
from tests.helpers.processes import refused

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
    from fn_analyze.record.token_rows import shards_of

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
    settings = _settings(groups=((0, acts.n_neurons),))
    cached = reduce(acts, settings)
    recomputed = reduce(rows, settings)
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
    from fn_analyze.record.token_rows import shards_of

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
        (["--activations", "A", "--dtype", "float16"], ("--dtype", "a folder holds its own tokens")),
        (["--model", "M", "--dataset", "D", "--engine", "dask"], ("--engine", "in this process")),
    ],
)
def test_the_source_is_a_folder_or_a_model_and_a_dataset(args: list[str], fragments: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, ["ica", *args])
    refused(result, *fragments)


def _settings(groups: tuple[tuple[int, int], ...], **overrides) -> ReductionSettings:
    return ReductionSettings(groups, k=6, seed=0, oversample=10, tol=1e-6, max_passes=40, splits=2, **overrides)


@pytest.mark.parametrize(
    "held", [{"hold": True, "resident": False}, {"hold": False, "resident": True}], ids=["centered", "raw"]
)
def test_rows_held_in_memory_give_the_streamed_reduction_bit_for_bit(collected: Path, held: dict) -> None:
    acts = open_activations(collected)
    groups = ((0, 176), (176, acts.n_neurons))  # one ICA per layer: two column groups
    # The kept rows chosen on held blocks too; scaled columns, so the held blocks are scaled as well.
    prep = Preprocessing(rows=RowFilter(positions=(0,)), scale="layer")
    streamed = reduce(acts, _settings(groups, prep=prep, resident=False, hold=False))
    kept = reduce(acts, _settings(groups, prep=prep, **held))
    for streamed_group, held_group in zip(streamed, kept, strict=True):
        for a, b in zip(streamed_group, held_group, strict=True):
            assert (a.passes, a.n_rows) == (b.passes, b.n_rows) and a.passes > 2
            np.testing.assert_array_equal(a.maps, b.maps)
            np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)


def test_the_centered_rows_are_held_when_asked_and_they_fit_the_memory(collected: Path, monkeypatch, caplog) -> None:
    from fn_analyze.networks import reduction

    acts = open_activations(collected)
    n_shards = len(shards_of(acts))
    needed = held_bytes(shards_of(acts), splits=2, precision="float32")
    assert needed == 2 * acts.n_tokens * acts.n_neurons * 4
    made = []
    centered_blocks = reduction.centered_blocks
    monkeypatch.setattr(reduction, "centered_blocks", lambda *args: made.append(1) or centered_blocks(*args))
    # RESIDENT_SHARE: half of what is available; not asked: streamed whatever the memory.
    for available, hold, held in ((2 * needed, True, True), (2 * needed - 2, True, False), (10**15, False, False)):
        made.clear()
        monkeypatch.setattr(reduction, "available_memory", lambda device, available=available: available)
        with caplog.at_level(logging.INFO, logger="fn_analyze.networks.reduction"):
            passes = reduce(acts, _settings(((0, acts.n_neurons),), hold=hold))[0][0].passes
        assert len(made) == n_shards * (1 if held else passes)  # centered once, or on every pass
        assert ("centered rows are held" in caplog.text) == held
        assert ("do not fit half" in caplog.text) == (hold and not held)
        caplog.clear()


def test_holding_the_rows_is_refused_with_the_dask_engine(collected: Path) -> None:
    with pytest.raises(ParameterError, match="hold keeps the rows in this process; drop it or engine dask"):
        reduce(open_activations(collected), _settings(((0, 352),), hold=True, engine="dask"))


def test_float64_products_converge_at_least_as_fast_to_the_same_maps(collected: Path) -> None:
    """On these rows float32 products stall at their rounding noise (40 passes, not converged) where
    float64 ones converge: why the reduction runs float64 products on a GPU."""
    acts = open_activations(collected)
    groups = ((0, acts.n_neurons),)
    single = reduce(acts, _settings(groups, precision="float32"))
    double = reduce(acts, _settings(groups, precision="float64"))
    for a, b in zip(single[0], double[0], strict=True):
        assert b.converged and b.passes <= a.passes
        np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=1e-5)
        np.testing.assert_allclose(b.maps, a.maps, atol=1e-4)


def test_rows_fit_the_device_by_the_bytes_they_are_held_in(collected: Path, monkeypatch) -> None:
    import torch

    from fn_analyze.networks.reduction import fits_on_device
    from fn_analyze.record.token_rows import ActivationMatrix, shards_of

    shards = shards_of(open_activations(collected))
    values = sum(shard.n_tokens * shard.n_columns for shard in shards)
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 10 * values))
    free["bytes"] = 4 * values  # half of it holds the float16 rows exactly
    assert fits_on_device(shards, "cuda:0")
    free["bytes"] = 4 * values - 4
    assert not fits_on_device(shards, "cuda:0")
    as_float32 = shards_of(ActivationMatrix.of(np.zeros((values // 352, 352), dtype=np.float32), layers=[0, 1]))
    free["bytes"] = 4 * values
    assert not fits_on_device(as_float32, "cuda:0")  # held as float32: twice the bytes
    free["bytes"] = 8 * values
    assert fits_on_device(as_float32, "cuda:0")
