"""A full disk, for real: collect and fn-train write to a small tmpfs (mounted in a user
namespace, no root needed), fail with one line, keep what was finished, and resume once the
filesystem is made larger."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.activations import assert_same_rows, shard_rows
from tests.helpers.processes import stop_line, subprocess_env
from tests.helpers.training import small_run, train_args

# Waits (inotify, no polling) until the file argv[1] is written by the process argv[2].
_WAIT_FOR_FILE = (
    "import sys, types; from pathlib import Path; from tests.helpers.processes import wait_for_file; "
    "wait_for_file(Path(sys.argv[1]), types.SimpleNamespace(pid=int(sys.argv[2])))"
)


def _on_small_disk(
    tmp_path: Path, size: str, first: list[str], second: list[str], fill_once: Path | None = None
) -> tuple[int, str, int, str]:
    """Run `first` with tmp_path/disk a tmpfs of `size` (and, once `fill_once` exists, another
    file filling the disk, as another job would after the run's own estimate), then `second`
    after the filler is deleted and the disk grown to 64 MB. The disk's files after each run are
    copied to tmp_path/full and tmp_path/after. Returns both exit codes and stderrs."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user namespace here to mount a small tmpfs")
    disk, after = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    log = {name: tmp_path / name for name in ("rc1", "err1", "rc2", "err2")}
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {disk} || exit 99\n"
        f"{shlex.join(first)} >/dev/null 2>{log['err1']} &\n"
        + (
            # The event wakes the filler at once, so it may fill the disk in the middle of collect's next
            # HDF5 write: collect then abandons that shard and still ends with its one line and exit 2.
            f"{sys.executable} -c {shlex.quote(_WAIT_FOR_FILE)} {fill_once} $!\n"
            f"dd if=/dev/zero of={disk}/filler bs=64k 2>/dev/null\n"
            if fill_once
            else ""
        )
        + f"wait $!; echo $? >{log['rc1']}\n"
        f"rm -f {disk}/filler; cp -a {disk} {tmp_path / 'full'}\n"
        f"mount -o remount,size=64m {disk}\n"
        f"{shlex.join(second)} >/dev/null 2>{log['err2']}; echo $? >{log['rc2']}\n"
        f"cp -a {disk} {after}\n"
    )
    env = subprocess_env(OMP_NUM_THREADS="1")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, timeout=600)
    assert done.returncode == 0, "the tmpfs could not be mounted"
    return (
        int(log["rc1"].read_text()),
        log["err1"].read_text(),
        int(log["rc2"].read_text()),
        log["err2"].read_text(),
    )


@pytest.mark.slow  # two collect processes over 1,200 records
def test_collect_on_a_full_disk_keeps_the_finished_shards_and_resumes(
    tiny_lm_dir, big_data, big_data_collected, tmp_path
) -> None:
    out = tmp_path / "disk" / "acts"
    command = [sys.executable, "-m", "fn_analyze.cli", "collect", "--model", str(tiny_lm_dir), "--batch-size", "4"]
    command += ["--dataset", str(big_data), "--out", str(out), "--shard-size-mb", "1"]
    # 33 MB of activations: the estimate passes on 48 MB, then a filler takes the rest after two shards.
    rc1, err1, rc2, err2 = _on_small_disk(tmp_path, "48m", command, command, fill_once=out / "shard-r00-00001.h5")
    assert rc1 == 2, err1[-2000:]
    line = stop_line(err1)
    assert line.startswith(f"error: the disk holding {out} is full ("), err1[-2000:]
    assert "No space left on device" in line or "errno = 28" in line
    assert line.endswith("finished shard(s) are kept: free some space and re-run the same command to resume")
    kept = sorted(p.name for p in (tmp_path / "full" / "acts").iterdir())
    assert len(kept) >= 2 and all(name.endswith(".h5") for name in kept)  # no .partial, no manifest
    assert rc2 == 0, err2[-2000:]
    assert_same_rows(shard_rows(tmp_path / "after" / "acts"), shard_rows(big_data_collected))


@pytest.mark.slow  # two fn-train processes
def test_a_checkpoint_save_on_a_full_disk_keeps_the_last_whole_one_and_resumes(tiny_lm_dir, demo_dir, tmp_path) -> None:
    from fn_train.trainer import train

    measured = tmp_path / "measured"
    train(small_run(tiny_lm_dir, demo_dir, measured, None, max_steps=1, save_steps=1, use_peft=False))
    checkpoint_bytes = sum(p.stat().st_size for p in (measured / "checkpoint-1").rglob("*") if p.is_file())
    out = tmp_path / "disk" / "out"
    flags = ["--no_peft", "--max_seq_length", "64", "--per_device_train_batch_size", "4", "--save_steps", "1"]
    first = [
        sys.executable,
        "-m",
        "fn_train.cli",
        *train_args(tiny_lm_dir, demo_dir / "train.csv", out, *flags, max_steps=3),
    ]
    second = [*first, "--resume_from_checkpoint", "last"]
    size = f"{int(checkpoint_bytes * 1.5) // 1024}k"  # room for one checkpoint, not two
    rc1, err1, rc2, err2 = _on_small_disk(tmp_path, size, first, second)
    assert rc1 == 2, err1[-3000:]
    line = stop_line(err1)
    assert line.startswith(f"error: the disk holding {out} is full ("), err1[-3000:]
    assert line.endswith("checkpoint-1 is kept: free some space and re-run with --resume_from_checkpoint last")
    full = tmp_path / "full" / "out"
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-1"]  # the cut checkpoint-2 removed
    assert rc2 == 0, err2[-3000:]
    assert (tmp_path / "after" / "out" / "model.safetensors").is_file()
    assert (tmp_path / "after" / "out" / "checkpoint-3" / "trainer_state.json").is_file()
