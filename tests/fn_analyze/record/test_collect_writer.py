"""Collect's writing side: the writer beside the model writes the in-loop shards byte for byte,
each shard in whole blocks, one collect per folder, a full disk that never crashes the process,
the token sample recorded, and a disk too small refused before anything is written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fn_analyze.record.activations as activations_module
import fn_analyze.record.collect as collect_module
from fn_analyze.cli import app
from fn_analyze.record.activations import ShardWriter, open_activations
from fn_analyze.record.collect import (
    CollectConfig,
    collect,
    load_recording,
    plan_collection,
    record_shards,
    write_manifest,
)
from fn_analyze.record.writer_lock import sole_writer
from shared.constants import WRITER_LOCK_NAME
from shared.errors import UserError
from tests.helpers.activations import assert_same_rows, shard_rows
from tests.helpers.processes import ROOT, refused, subprocess_env, wait_for_file


def _record(config: CollectConfig, overlap: bool) -> dict:
    plan = plan_collection(config)
    recording = load_recording(plan)
    return write_manifest(plan, recording, record_shards(plan, recording, overlap=overlap))


def test_the_writer_beside_the_model_writes_the_in_loop_shards_byte_for_byte(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(activations_module, "FLUSH_BYTES", 64 * 1024)  # several blocks to each shard
    writers: list[str] = []
    write = ShardWriter.write

    def spy(self, *args, **kwargs):
        writers.append(threading.current_thread().name)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write", spy)
    folders = {}
    for overlap in (True, False):
        folders[overlap] = tmp_path / f"overlap-{overlap}"
        config = CollectConfig(
            dataset=str(demo_dir / "data.jsonl"), out=folders[overlap], model=str(tiny_lm_dir), shard_size_mb=1
        )
        _record(config, overlap)
    main = threading.main_thread().name
    in_thread = [name != main for name in writers]
    assert in_thread[: len(in_thread) // 2] == [True] * (len(in_thread) // 2)  # overlapped: the writer thread
    assert not any(in_thread[len(in_thread) // 2 :])  # in the loop: the main thread
    names = sorted(p.name for p in folders[True].iterdir())
    assert names == sorted(p.name for p in folders[False].iterdir())
    assert sum(name.endswith(".h5") for name in names) > 1  # shard rotation is exercised
    for name in names:
        if name.endswith(".h5"):
            assert (folders[True] / name).read_bytes() == (folders[False] / name).read_bytes(), name


def test_each_shard_is_written_in_whole_blocks(tmp_path: Path, monkeypatch) -> None:
    """A new shard's first block is as large as any other, not the one batch that closed the shard before."""
    blocks: list[int] = []
    check_room = ShardWriter._check_room

    def spy(self):  # once before each block's write
        blocks.append(self._pending_rows)
        check_room(self)

    monkeypatch.setattr(ShardWriter, "_check_room", spy)
    writer = ShardWriter(tmp_path, n_columns=4, rows_per_shard=10)
    for batch in range(8):
        rows = np.full((3, 4), batch, np.float16)
        writer.write(rows, np.zeros(3, np.int32), np.full(3, batch), np.arange(3, dtype=np.int32), next_record=batch)
    shards = writer.close()
    assert [shard["n_tokens"] for shard in shards] == [12, 12]
    assert blocks == [12, 12]


def test_a_second_collect_into_a_folder_being_written_is_refused_naming_the_first(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    config = CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=out, model=str(tiny_lm_dir))
    with sole_writer(out):  # as a first collect holds it
        assert (out / WRITER_LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(UserError, match=rf"--out {out} is being written by another collect \(pid {os.getpid()} on"):
            collect(config)
        assert sorted(p.name for p in out.iterdir()) == [WRITER_LOCK_NAME]  # nothing of the second written
    assert not out.exists()  # the folder the lock made, empty, is gone with it
    manifest = collect(config).manifest
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-r00-00000.h5"]  # the lock file gone
    assert manifest["n_tokens"] == open_activations(out).n_tokens


def test_the_lock_file_of_a_killed_collect_does_not_block_the_next(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    out.mkdir()
    (out / WRITER_LOCK_NAME).write_text("pid 1 on elsewhere, started long ago: fn-analyze collect")  # left, unlocked
    collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=out, model=str(tiny_lm_dir)))
    assert not (out / WRITER_LOCK_NAME).exists()


@pytest.mark.slow  # a collect process over 1,200 records, and the same command in this process
def test_the_same_collect_in_a_second_terminal_is_refused_and_the_first_finishes_whole(
    tiny_lm_dir: Path, big_data: Path, big_data_collected: Path, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    command = [sys.executable, "-m", "fn_analyze.cli", "collect", "--model", str(tiny_lm_dir)]
    command += ["--dataset", str(big_data), "--out", str(out), "--shard-size-mb", "1"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(out / "shard-r00-00000.h5.partial", first, timeout=600, created=True)  # slow under load
        first.send_signal(signal.SIGSTOP)  # paused mid-run, so that the second surely meets it writing
        second = CliRunner().invoke(app, command[3:])  # the same command, in this process (another pid)
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    refused(second, f"--out {out} is being written by another collect (pid {first.pid} on ", "collect --model")
    assert first.returncode == 0, stderr[-2000:]
    assert_same_rows(shard_rows(out), shard_rows(big_data_collected))


_FILL_THE_DISK = """
import sys
from pathlib import Path
import numpy as np
import typer
import fn_analyze.record.activations as activations
from fn_analyze.record.activations import ShardWriter
from shared.cli import handle_errors
from shared.errors import UserError

ShardWriter._check_room = lambda self: None  # as when another job takes the room after the check
activations.FLUSH_BYTES = 1  # each batch written at once


@handle_errors("fill")  # the command line's handler, as collect's
def fill(folder: Path) -> None:
    writer = ShardWriter(folder, n_columns=4096, rows_per_shard=10**6)
    rows = np.ones((512, 4096), np.float16)
    try:
        for batch in range(1000):
            writer.write(rows, np.zeros(512, np.int32), np.zeros(512), np.zeros(512, np.int32), next_record=batch)
    except Exception as exc:
        writer.abort(discard=True)
        raise UserError(f"full {sorted(p.name for p in folder.iterdir())}") from exc


try:
    fill(Path(sys.argv[1]))
except typer.Exit as exit:
    sys.exit(exit.exit_code)
"""


def test_a_shard_whose_write_fills_the_disk_is_discarded_without_crashing_the_process(tmp_path: Path) -> None:
    """HDF5 failing mid-write left a file it could not close, which crashed the process at exit."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user namespace here to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(textwrap.dedent(_FILL_THE_DISK))
    runs = (
        f"mount -t tmpfs -o size=3m tmpfs {disk} || exit 99\n"
        f"for i in 1 2 3; do {sys.executable} {script} {disk}; echo $?; rm -f {disk}/*; done\n"
    )
    done = subprocess.run(["unshare", "-rm", "sh", "-c", runs], env=subprocess_env(), capture_output=True, text=True)
    assert done.stdout.split() == ["2", "2", "2"], done.stdout + done.stderr[-2000:]  # 139: a segfault at exit
    assert done.stderr.count("full []") == 3, done.stderr[-2000:]  # the unfinished shard is gone


def test_the_token_sample_is_seeded_and_recorded_in_the_manifest(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    data = str(demo_dir / "data.jsonl")
    manifests = [
        collect(
            CollectConfig(
                dataset=data, out=tmp_path / name, model=str(tiny_lm_dir), tokens_per_sequence=4, skip_first_token=True
            )
        ).manifest
        for name in ("a", "b")
    ]
    assert manifests[0]["sample"] == {
        "tokens_per_sequence": 4,
        "token_rate": None,
        "seed": 0,
        "skip_first_token": True,
    }
    rows = [shard_rows(tmp_path / name) for name in ("a", "b")]
    assert_same_rows(rows[0], rows[1])
    assert rows[0]["position"].min() >= 1  # position 0 never drawn
    assert np.bincount(rows[0]["sequence_index"]).max() == 4
    other = collect(
        CollectConfig(dataset=data, out=tmp_path / "c", model=str(tiny_lm_dir), tokens_per_sequence=4, seed=1)
    ).manifest
    assert other["sample"]["seed"] == 1 and other["sample"]["skip_first_token"] is False
    assert not np.array_equal(shard_rows(tmp_path / "c")["position"], rows[0]["position"])


def test_a_disk_too_small_is_refused_before_anything_is_written(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(collect_module.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 4096, 4096))
    out = tmp_path / "acts"
    with pytest.raises(UserError, match=rf"collect needs about 0\.\d\d GiB but {out} has 0\.00 GiB free; lower"):
        collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=out, model=str(tiny_lm_dir)))
    assert not out.exists()


def test_collect_refuses_a_disk_too_small_in_one_line_with_exit_2(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    """As a user meets it: a real small disk (a tmpfs), one line, exit 2, the folder not made."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user namespace here to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    command = [sys.executable, "-m", "fn_analyze.cli", "collect", "--model", str(tiny_lm_dir)]
    command += ["--dataset", str(demo_dir / "data.jsonl"), "--out", str(disk / "acts")]
    script = f"mount -t tmpfs -o size=64k tmpfs {disk} || exit 99\n{' '.join(command)}; echo rc=$?; ls -A {disk}"
    env = subprocess_env(OMP_NUM_THREADS="1")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split()[-1:] == ["rc=2"], done.stdout + done.stderr[-2000:]  # and `ls` found nothing
    line = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert line[0].startswith("error: collect needs about 0.0") and f"but {disk / 'acts'} has 0.00 GiB free" in line[0]


@pytest.mark.parametrize("flags", [[], ["--quiet"]])
def test_collect_shows_a_progress_bar_on_stderr_unless_quiet(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, flags: list[str]
) -> None:
    args = ["collect", "--model", str(tiny_lm_dir), "--dataset", str(demo_dir / "data.jsonl"), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*flags, *args])
    assert result.exit_code == 0, result.output
    bar = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("collect:")]
    if flags:
        assert bar == [], result.stderr
    else:
        assert bar and "tok/s" in bar[-1] and "100%" in bar[-1], result.stderr
    assert "collect: wrote" in result.stdout
