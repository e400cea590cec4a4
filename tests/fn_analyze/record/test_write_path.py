"""What the recording's write path does to save the forward pass work, kept honest: blocks end on
HDF5 chunk boundaries without copying the batches, each block is handed to the kernel to write
back, whole chunks go to the disk past the page cache where the system allows (and through HDF5,
the same bytes, where it does not), and the rows' host buffers are reused only once nothing refers
to what they held."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import fn_analyze.record.activations as activations_module
from fn_analyze.record.activations import ShardWriter, chunk_runs, verify_activations
from fn_analyze.record.collect import CollectConfig, collect
from fn_analyze.record.direct_writes import ALIGNED_CHUNK_BYTES, DirectChunks, aligned_empty
from fn_analyze.record.row_buffers import HostRowBuffers
from shared.constants import ACTIVATIONS_DATASET, PARTIAL_SUFFIX, ROWS_DIGEST_ATTR
from shared.digests import RowsDigest
from shared.errors import is_disk_full
from tests.helpers.tiny_models import tiny_model


def _rows(n: int, first: int, columns: int = 3) -> np.ndarray:
    return (np.arange(first, first + n)[:, None] * 10 + np.arange(columns)).astype(np.float16)


def test_chunk_runs_cut_whole_chunks_and_copy_only_the_chunk_two_parts_share() -> None:
    a, b, c = _rows(100, 0), _rows(10, 100), _rows(200, 110)
    runs, rest = chunk_runs([a, b, c], 64)
    assert [len(run) for run in runs] == [64, 64, 128]
    assert np.shares_memory(runs[0], a) and np.shares_memory(runs[2], c)  # views of one part each
    assert not any(np.shares_memory(runs[1], part) for part in (a, b, c))  # a's last 36, b, c's first 18
    assert rest is not None and len(rest) == 54 and np.shares_memory(rest, c)
    np.testing.assert_array_equal(np.concatenate([*runs, rest]), np.concatenate([a, b, c]))


def test_chunk_runs_keep_every_row_in_order_for_any_cut() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        chunk = int(rng.integers(1, 20))
        sizes = rng.integers(0, 50, size=rng.integers(1, 8))
        parts = [_rows(int(n), int(sum(sizes[:i]))) for i, n in enumerate(sizes)]
        runs, rest = chunk_runs(parts, chunk)
        assert all(len(run) % chunk == 0 and len(run) > 0 for run in runs)
        assert rest is None or 0 < len(rest) < chunk
        joined = np.concatenate([*runs, *([] if rest is None else [rest])]) if runs or rest is not None else None
        expected = np.concatenate(parts)
        if len(expected):
            np.testing.assert_array_equal(joined, expected)
        else:
            assert joined is None


def test_the_writer_writes_whole_chunks_until_the_shard_ends_on_its_last_batch(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(activations_module, "FLUSH_BYTES", 100 * 3 * 2)  # a block every 100 rows or so
    stores: list[tuple[int, int]] = []
    store = ShardWriter._store

    def spy(self, key, start, values):
        if key == ACTIVATIONS_DATASET:
            stores.append((start, len(values)))
        store(self, key, start, values)

    monkeypatch.setattr(ShardWriter, "_store", spy)
    writer = ShardWriter(tmp_path, n_columns=3, rows_per_shard=10**6)
    batches = [_rows(37, 37 * i) for i in range(10)]
    for i, rows in enumerate(batches):
        n = len(rows)
        writer.write(rows, np.zeros(n, np.int32), np.full(n, i), np.arange(n, dtype=np.int32), next_record=i + 1)
    [shard] = writer.close()
    assert shard["n_tokens"] == 370 and shard["next_record"] == 10
    *blocks, last = stores
    assert blocks and all(start % 64 == 0 and length % 64 == 0 for start, length in blocks)
    assert last[0] % 64 == 0 and last[0] + last[1] == 370  # the shard's last block: every row left
    with h5py.File(tmp_path / shard["file"]) as handle:
        np.testing.assert_array_equal(handle[ACTIVATIONS_DATASET][:], np.concatenate(batches))
        assert handle.attrs["next_record"] == 10


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this system")
def test_each_block_is_handed_to_the_kernel_to_write_back_and_drop(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(activations_module, "FLUSH_BYTES", 64 * 3 * 2)
    advised: list[tuple[str, int]] = []
    fadvise = os.posix_fadvise

    def spy(fd, offset, length, advice):
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    writer = ShardWriter(tmp_path, n_columns=3, rows_per_shard=10**6)
    for i in range(4):
        writer.write(_rows(64, 64 * i), np.zeros(64, np.int32), np.full(64, i), np.zeros(64, np.int32), i + 1)
    assert advised == [(str(tmp_path / "shard-r00-00000.h5") + PARTIAL_SUFFIX, os.POSIX_FADV_DONTNEED)] * 4
    writer.close()


def test_a_host_buffer_is_reused_only_once_nothing_refers_to_its_rows() -> None:
    buffers = HostRowBuffers(n_columns=4)
    first = buffers.rows(5)
    first.fill_(1)
    first_buffer = first.data_ptr()
    second = buffers.rows(5)  # the first rows are held: another buffer
    assert second.data_ptr() != first_buffer and buffers.n_buffers == 2
    kept = first.numpy()[2:]  # an array made from the rows holds them as well
    del first
    third = buffers.rows(5)
    assert third.data_ptr() not in {first_buffer, second.data_ptr()} and buffers.n_buffers == 3
    third.fill_(3)
    assert (kept == 1).all()
    del kept, third
    again = buffers.rows(3)  # the first buffer is free now: reused, no new one
    assert again.data_ptr() == first_buffer and buffers.n_buffers == 3 and again.shape == (3, 4)
    del again, second
    bigger = buffers.rows(8)  # larger than every free buffer: those are let go
    assert buffers.n_buffers == 1 and bigger.shape == (8, 4)


WIDE = 4096  # float16 columns: 8 KiB rows, 512 KiB chunks, placed on page boundaries in the file


def _direct_supported(folder: Path) -> bool:
    probe = folder / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except (AttributeError, OSError):
        return False
    finally:
        probe.unlink()


def _write_wide_shard(folder: Path, batches: list[np.ndarray]) -> dict:
    folder.mkdir(exist_ok=True)
    writer = ShardWriter(folder, n_columns=WIDE, rows_per_shard=10**6)
    for i, rows in enumerate(batches):
        n = len(rows)
        writer.write(rows, np.zeros(n, np.int32), np.full(n, i), np.arange(n, dtype=np.int32), next_record=i + 1)
    [shard] = writer.close()
    return shard


def _wide_batches(buffers: HostRowBuffers, sizes: list[int]) -> tuple[list[torch.Tensor], np.ndarray]:
    """Batches in the collect's own row buffers (held, so each has its own), and their rows joined."""
    rng = np.random.default_rng(0)
    held = []
    for n in sizes:
        rows = buffers.rows(n)
        rows.copy_(torch.from_numpy(rng.standard_normal((n, WIDE)).astype(np.float16)))
        held.append(rows)
    return held, np.concatenate([rows.numpy() for rows in held])


def _read_back(path: Path) -> np.ndarray:
    with h5py.File(path) as handle:
        values = handle[ACTIVATIONS_DATASET][:]
        digest = RowsDigest()
        digest.update(values)
        assert handle[ACTIVATIONS_DATASET].attrs[ROWS_DIGEST_ATTR] == digest.hexdigest()
    return values


def test_whole_chunks_are_written_past_the_page_cache_and_read_back_as_written(tmp_path: Path, monkeypatch) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this system or filesystem")
    monkeypatch.setattr(activations_module, "FLUSH_BYTES", 150 * WIDE * 2)
    written: list[tuple[int, int, int]] = []  # (memory address, file offset, bytes) of each direct write
    pwrite = os.pwrite

    def spy(fd, data, offset):
        written.append((np.frombuffer(data, np.uint8).ctypes.data, offset, memoryview(data).nbytes))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    held, expected = _wide_batches(HostRowBuffers(WIDE), [100, 37, 230, 90, 41])  # 498 rows: 7 whole chunks
    shard = _write_wide_shard(tmp_path, [rows.numpy() for rows in held])
    assert len(written) == 7 and all(length == 64 * WIDE * 2 for _, _, length in written)
    assert all(address % 4096 == 0 and offset % 4096 == 0 for address, offset, _ in written)
    assert len({offset for _, offset, _ in written}) == 7  # seven places, one a chunk
    np.testing.assert_array_equal(_read_back(tmp_path / shard["file"]), expected)


def test_a_disk_that_refuses_the_alignment_gets_the_same_bytes_through_hdf5(tmp_path: Path, monkeypatch) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this system or filesystem")
    monkeypatch.setattr(activations_module, "FLUSH_BYTES", 150 * WIDE * 2)
    tries = []

    def refuse(fd, data, offset):  # as a disk with 4 KiB logical blocks answers a 512-aligned write
        tries.append(offset)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", refuse)
    held, expected = _wide_batches(HostRowBuffers(WIDE), [100, 37, 230, 90, 41])
    shard = _write_wide_shard(tmp_path, [rows.numpy() for rows in held])
    assert len(tries) == 1  # the first refusal ends direct writes for the shard
    np.testing.assert_array_equal(_read_back(tmp_path / shard["file"]), expected)


def test_rows_off_the_alignment_and_systems_without_o_direct_go_through_hdf5(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(activations_module, "FLUSH_BYTES", 150 * WIDE * 2)
    calls = []
    monkeypatch.setattr(os, "pwrite", lambda *args: calls.append(args))
    rng = np.random.default_rng(1)
    raw = np.empty(300 * WIDE * 2 + 4096 + 16, np.uint8)
    skip = -raw.ctypes.data % 4096 + 16  # 16 bytes past a page: no disk takes it
    rows = raw[skip : skip + 300 * WIDE * 2].view(np.float16).reshape(300, WIDE)
    rows[:] = rng.standard_normal((300, WIDE)).astype(np.float16)
    shard = _write_wide_shard(tmp_path / "unaligned", [rows[:128], rows[128:]])
    np.testing.assert_array_equal(_read_back(tmp_path / "unaligned" / shard["file"]), rows)
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    held, expected = _wide_batches(HostRowBuffers(WIDE), [128, 172])
    shard = _write_wide_shard(tmp_path / "no-direct", [rows.numpy() for rows in held])
    np.testing.assert_array_equal(_read_back(tmp_path / "no-direct" / shard["file"]), expected)
    assert calls == []


def test_a_full_disk_under_a_direct_write_is_a_full_disk_and_the_shard_stays_partial(
    tmp_path: Path, monkeypatch
) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this system or filesystem")
    monkeypatch.setattr(activations_module, "FLUSH_BYTES", 64 * WIDE * 2)
    pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: pwrite(fd, memoryview(data).cast("B")[:4096], offset))
    held, _ = _wide_batches(HostRowBuffers(WIDE), [64])
    writer = ShardWriter(tmp_path, n_columns=WIDE, rows_per_shard=10**6)
    with pytest.raises(OSError) as raised:  # the disk took 4 KiB of the chunk's 512
        writer.write(held[0].numpy(), np.zeros(64, np.int32), np.zeros(64), np.zeros(64, np.int32), next_record=1)
    assert raised.value.errno == errno.ENOSPC and is_disk_full(raised.value)
    writer.abort()  # collect discards it; test_collect_writer does, in a child: a discard marks the process
    assert [path.name for path in tmp_path.iterdir()] == ["shard-r00-00000.h5" + PARTIAL_SUFFIX]  # never read


def test_a_direct_write_takes_whole_chunks_from_a_chunk_boundary_only(tmp_path: Path, monkeypatch) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this system or filesystem")
    calls = []
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: calls.append(offset) or memoryview(data).nbytes)
    path = tmp_path / "chunks.h5"
    with h5py.File(path, "w", alignment_threshold=ALIGNED_CHUNK_BYTES, alignment_interval=4096) as handle:
        places = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        places.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dataset = handle.create_dataset("a", (256, WIDE), "float16", chunks=(64, WIDE), dcpl=places, fill_time="never")
        rows = aligned_empty((128, WIDE), np.float16)
        direct = DirectChunks(path)
        try:
            assert not direct.write(dataset, 32, rows)  # from the middle of a chunk: HDF5's to write
            assert not direct.write(dataset, 64, rows[:100])  # not whole chunks
            assert calls == []
            assert direct.write(dataset, 128, rows)
            chunk_places = [dataset.id.get_chunk_info_by_coord((row, 0)).byte_offset for row in (128, 192)]
            assert calls == chunk_places
        finally:
            direct.close()


def test_collect_writes_a_wide_models_chunks_directly_and_the_same_shards_as_through_hdf5(
    tiny_tokenizer, demo_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this system or filesystem")
    model_dir = tmp_path / "wide-llama"  # 2 layers x 2,048 neurons: 8 KiB rows, 512 KiB chunks
    tiny_model("llama", vocab_size=len(tiny_tokenizer), max_position_embeddings=128, intermediate_size=2048,
               pad_token_id=tiny_tokenizer.pad_token_id).save_pretrained(model_dir)  # fmt: skip
    tiny_tokenizer.save_pretrained(model_dir)
    direct_writes: list[int] = []
    pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: direct_writes.append(offset) or pwrite(fd, data, offset))

    def collected(out: Path) -> list[dict[str, np.ndarray]]:
        config = CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=out, model=str(model_dir), max_tokens=700,
                               shard_size_mb=2, device="cpu")  # fmt: skip
        manifest = collect(config).manifest
        assert "match their digests" in verify_activations(out)
        shards = []
        for shard in manifest["shards"]:
            with h5py.File(out / shard["file"]) as handle:
                shards.append({key: handle[key][:] for key in handle})
        return shards

    direct = collected(tmp_path / "direct")
    whole_chunks = sum(len(shard["activations"]) // 64 for shard in direct)  # a shard ends on a batch: 280 rows, ...
    assert len(direct) == 3 and whole_chunks > 3 and len(direct_writes) == whole_chunks  # every one written directly
    written = len(direct_writes)
    monkeypatch.delattr(os, "O_DIRECT")
    through_hdf5 = collected(tmp_path / "hdf5")
    assert len(direct_writes) == written  # none this time
    assert len(through_hdf5) == len(direct)
    for ours, theirs in zip(direct, through_hdf5, strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key])
