"""Integrity of activations: a cut or damaged shard is named in one line with its repair, found
when the folder is opened (cut) or read (the rows' XXH3-128), and fully by `fn-analyze verify`;
re-running collect re-records only the damaged shard; folders of older versions (Fletcher-32 and
SHA-256, or no checksums) still read, checked by what they carry."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import xxhash
from typer.testing import CliRunner

from fn_analyze.cli import app
from fn_analyze.record.activations import open_activations
from fn_analyze.record.collect import CollectConfig, collect
from fn_analyze.record.token_rows import shards_of
from shared.digests import file_digest
from shared.errors import UserError
from tests.helpers.activations import write_activations
from tests.helpers.processes import refused, stop_line

runner = CliRunner()


def _acts(tmp_path: Path) -> Path:
    data = np.random.default_rng(0).laplace(size=(600, 2 * 30)).astype(np.float32)
    return write_activations(tmp_path / "acts", data, [0, 1], 30, rows_per_shard=200)


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte_of_the_activations(path: Path, dataset: str = "activations") -> None:
    with h5py.File(path, "r") as handle:
        info = handle[dataset].id.get_chunk_info(handle[dataset].id.get_num_chunks() - 1)
        offset = info.byte_offset + 10
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _as_an_older_collect_wrote_it(folder: Path) -> None:
    """Rewrite every shard as collect wrote them before XXH3-128: a Fletcher-32 checksum on every chunk,
    no hash attributes, and the SHA-256 of the whole file in the manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        with h5py.File(path, "r") as handle:
            datasets = {key: (handle[key][:], handle[key].chunks) for key in handle}
            attrs = dict(handle.attrs)
        with h5py.File(path, "w") as handle:
            for key, (values, chunks) in datasets.items():
                handle.create_dataset(
                    key, data=values, chunks=chunks, maxshape=(None, *values.shape[1:]), fletcher32=True
                )
            handle.attrs.update(attrs)
        entry["digest"] = file_digest(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_verify_passes_a_whole_folder_and_names_a_damaged_shard(tmp_path: Path) -> None:
    acts = _acts(tmp_path)
    result = runner.invoke(app, ["verify", str(acts)])
    assert result.exit_code == 0 and f"the 3 shard(s) of {acts} (600 tokens) match their digests" in result.output
    _flip_a_byte_of_the_activations(acts / "shard-r00-00001.h5")
    refused(
        runner.invoke(app, ["verify", str(acts)]),
        "activations shard shard-r00-00001.h5 in",
        "does not match its digest",
        "re-run the `fn-analyze collect` command that wrote the folder (same arguments)",
    )
    # The ICA's own read hashes the rows it reads: one line, not a traceback, and no mask file.
    result = runner.invoke(app, ["ica", "--activations", str(acts), "--out", str(tmp_path / "m.json"), "--runs", "1"])
    line = stop_line(result.output)  # after the ica's own progress line
    assert result.exit_code == 2 and "activations shard shard-r00-00001.h5" in line
    assert "does not match its digest xxh3-128:" in line
    assert not (tmp_path / "m.json").exists()


def test_the_digest_is_the_rows_as_written_and_every_read_checks_it(tmp_path: Path) -> None:
    acts = _acts(tmp_path)
    entry = json.loads((acts / "manifest.json").read_text())["shards"][1]
    with h5py.File(acts / entry["file"], "r") as handle:  # recomputed here from the stored bytes, by xxhash itself
        hashes = {key: xxhash.xxh3_128_hexdigest(handle[key][:].tobytes()) for key in sorted(handle)}
    listed = ";".join(f"{key}={value}" for key, value in hashes.items())
    assert entry["digest"] == "xxh3-128:" + xxhash.xxh3_128_hexdigest(listed.encode())

    _flip_a_byte_of_the_activations(acts / entry["file"], "sequence_index")  # a small dataset, read on its own
    shard = shards_of(open_activations(acts))[1]
    assert len(list(shard.blocks(50))) == 4  # the activations are whole
    with pytest.raises(
        UserError, match=r"activations shard shard-r00-00001\.h5 .* does not match its digest xxh3-128:"
    ):
        shard.records()
    refused(runner.invoke(app, ["verify", str(acts)]), "shard-r00-00001.h5", "does not match its digest xxh3-128:")


def test_a_shard_swapped_for_another_of_the_run_is_refused_when_opened(tmp_path: Path) -> None:
    acts = _acts(tmp_path)
    first, second = ((acts / f"shard-r00-0000{i}.h5").read_bytes() for i in (0, 1))
    (acts / "shard-r00-00000.h5").write_bytes(second)
    (acts / "shard-r00-00001.h5").write_bytes(first)
    refused(runner.invoke(app, ["ica", "--activations", str(acts), "--out", str(tmp_path / "m.json")]),
            "shard-r00-00000.h5", "does not match its digest xxh3-128:")  # fmt: skip


def test_a_folder_of_the_fletcher_and_sha256_collect_reads_and_is_checked_by_them(tmp_path: Path) -> None:
    acts = _acts(tmp_path)
    before = [block.copy() for block in open_activations(acts).blocks(100)]
    _as_an_older_collect_wrote_it(acts)
    after = list(open_activations(acts).blocks(100))
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)) and len(after) == len(before)
    result = runner.invoke(app, ["verify", str(acts)])
    assert result.exit_code == 0 and "match their digests" in result.output
    _flip_a_byte_of_the_activations(acts / "shard-r00-00001.h5")
    refused(runner.invoke(app, ["verify", str(acts)]), "shard-r00-00001.h5", "does not match its digest sha256:")
    # The ICA's read meets the chunk's Fletcher-32 checksum (HDF5's): one line, not an HDF5 traceback.
    result = runner.invoke(app, ["ica", "--activations", str(acts), "--out", str(tmp_path / "m.json"), "--runs", "1"])
    line = stop_line(result.output)
    assert result.exit_code == 2 and "activations shard shard-r00-00001.h5" in line
    assert "cannot be read (Can't synchronously read data (filter returned failure" in line
    assert not (tmp_path / "m.json").exists()


def test_a_shard_cut_in_half_is_refused_before_the_ica_runs(tmp_path: Path, monkeypatch) -> None:
    """The measured case: `fn-analyze ica` used to end in `OSError: ... truncated file` traceback."""
    import fn_analyze.networks.ica

    acts = _acts(tmp_path)
    _cut(acts / "shard-r00-00002.h5")
    monkeypatch.setattr(fn_analyze.networks.ica, "reduce", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    line = refused(
        runner.invoke(app, ["ica", "--activations", str(acts), "--out", str(tmp_path / "m.json")]),
        "activations shard shard-r00-00002.h5 in",
        "cannot be read (Unable to synchronously open file (truncated file",
        "re-run the `fn-analyze collect` command",
    )
    assert refused(runner.invoke(app, ["verify", str(acts)])) == line


def test_a_folder_without_checksums_still_reads_and_verify_says_so(tmp_path: Path) -> None:
    acts = _acts(tmp_path)
    manifest = json.loads((acts / "manifest.json").read_text())
    for shard in manifest["shards"]:  # as collect wrote manifests before the digests
        del shard["digest"], shard["next_record"]
    (acts / "manifest.json").write_text(json.dumps(manifest))
    assert open_activations(acts).n_tokens == 600
    result = runner.invoke(app, ["verify", str(acts)])
    assert result.exit_code == 0 and "holds no checksums (written by an older collect)" in result.output
    _cut(acts / "shard-r00-00000.h5")
    refused(runner.invoke(app, ["verify", str(acts)]), "shard-r00-00000.h5", "cannot be read")


def test_rerunning_collect_re_records_only_the_damaged_shard(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    config = CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=tmp_path / "acts", model=str(tiny_lm_dir))
    config.shard_size_mb = 1  # two shards of the demo data
    first = collect(config).manifest
    assert len(first["shards"]) == 2 and all(s["digest"].startswith("xxh3-128:") for s in first["shards"])
    whole = {name: (tmp_path / "acts" / name).read_bytes() for name in ("shard-r00-00000.h5", "shard-r00-00001.h5")}
    with h5py.File(tmp_path / "acts" / "shard-r00-00001.h5", "r") as handle:
        expected = {key: handle[key][:] for key in handle}
    _cut(tmp_path / "acts" / "shard-r00-00001.h5")

    config.batch_size = 3  # batch size does not decide the rows
    repaired = collect(config).manifest
    assert (tmp_path / "acts" / "shard-r00-00000.h5").read_bytes() == whole["shard-r00-00000.h5"]  # left alone
    assert repaired["shards"][0] == first["shards"][0] and repaired["n_tokens"] == first["n_tokens"]
    with h5py.File(tmp_path / "acts" / "shard-r00-00001.h5", "r") as handle:
        for key, values in expected.items():
            np.testing.assert_allclose(handle[key][:], values, rtol=1e-3, atol=1e-3)
    assert runner.invoke(app, ["verify", str(tmp_path / "acts")]).exit_code == 0
    refused(runner.invoke(app, ["collect", "--model", str(tiny_lm_dir), "--dataset", str(demo_dir / "data.jsonl"),
                                "--out", str(tmp_path / "acts"), "--shard-size-mb", "1"]),
            "already holds activations (every shard whole)")  # fmt: skip
