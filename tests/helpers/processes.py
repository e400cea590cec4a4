"""Running the commands as a user does: subprocesses, their environment, waiting on files, and the one-line refusals."""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fn_train.config import TrainConfig
from shared.errors import ParameterError
from shared.options import flag_namer

ROOT = Path(__file__).resolve().parents[2]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that runs this checkout's packages, offline."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


def train_on_two_ranks(*runs: list[str]) -> str:
    """Run `fn-train args` for each of `runs`, in turn, in one launch of two DDP ranks on the CPU
    (torchrun); their stdout. Fails on a non-zero exit; a hung rendezvous does not leave the ranks running."""
    ranks = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    launcher = subprocess.Popen(
        [sys.executable, *ranks, "-m", "tests.helpers.fn_train_in_turn", json.dumps(runs)],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 0, stderr[-3000:]
    return stdout


_IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x8, 0x80, 0x100


_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name that follows


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 120.0, created: bool = False) -> None:
    """Return once `process` has written `path`: closed it after writing or renamed it into place
    (with `created`: as soon as it is created). The kernel wakes the wait (inotify on the nearest
    folder of `path` that exists, a pidfd for the process): no polling. Fails when the process
    ends first or after `timeout` seconds. A file there before the wait began counts as written."""
    done = _IN_CREATE | _IN_MOVED_TO if created else _IN_CLOSE_WRITE | _IN_MOVED_TO
    libc = ctypes.CDLL(None, use_errno=True)
    watcher = libc.inotify_init1(os.O_CLOEXEC)
    assert watcher >= 0, f"inotify_init1 failed: {os.strerror(ctypes.get_errno())}"
    ended = os.pidfd_open(process.pid)
    deadline = time.monotonic() + timeout
    watched, parent_watch = None, -1
    try:
        while True:
            nearest = next(folder for folder in path.parents if folder.is_dir())
            if nearest != watched:  # a folder on the way appeared: watch the deeper one
                watch = libc.inotify_add_watch(watcher, bytes(nearest), _IN_CREATE | _IN_MOVED_TO | _IN_CLOSE_WRITE)
                watched = nearest
                if nearest == path.parent:
                    parent_watch = watch
                    if path.exists():
                        return
                continue  # the folders may have moved on while the watch was added
            ready, _, _ = select.select([watcher, ended], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"{path} was not written within {timeout:g} s"
            if watcher in ready:
                events, offset = os.read(watcher, 65536), 0
                while offset < len(events):
                    watch, mask, _, length = _INOTIFY_EVENT.unpack_from(events, offset)
                    name = events[offset + _INOTIFY_EVENT.size : offset + _INOTIFY_EVENT.size + length]
                    offset += _INOTIFY_EVENT.size + length
                    if watch == parent_watch and mask & done and name.rstrip(b"\0") == os.fsencode(path.name):
                        return
            assert ended not in ready, f"the process ended before it wrote {path}"
    finally:
        os.close(ended)
        os.close(watcher)


def refused(result: Any, *fragments: str, progress_bars: bool = False) -> str:
    """The one output line of a command refused with exit code 2, with no traceback; the line must
    hold every fragment. `result` is a CliRunner result or a finished subprocess (stdout and stderr
    read together); with `progress_bars`, a progress bar's lines (loading weights) may stand
    before it. Printed, so `pytest -s` lists every message users can get."""
    if isinstance(result, subprocess.CompletedProcess):
        exit_code, output, exception = result.returncode, result.stdout + result.stderr, None
    else:
        exit_code, output, exception = result.exit_code, result.output, result.exception
    lines = [line for line in output.splitlines() if line.strip() and not (progress_bars and "it/s]" in line)]
    assert exit_code == 2, f"exit {exit_code}: {output}\n{exception!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    print(f"REFUSED {lines[0]}")
    return lines[0]


def refused_by_config(make: Callable[[], object], config: type, flags: str, python: str | None = None) -> str:
    """The ParameterError that `make()` (a config built from Python, or one of its checks) raises: read
    from Python it names parameters, no flag (and holds `python` when given); worded by the command
    built from `config` (fn-train's TrainConfig with its written spellings), it matches the regex
    `flags`, the line the command line prints. Returns the Python message."""
    with pytest.raises(ParameterError) as info:
        make()
    said = str(info.value)
    assert "--" not in said and (python is None or python in said), said
    worded = info.value.as_flags(flag_namer(config, both_spellings=config is TrainConfig))
    assert re.search(flags, worded), worded
    return said


def stop_line(stderr: str) -> str:
    """The one line a user reads when a run stops (`stopped by ...`) or fails (`error: ...`),
    after the data's and the libraries' warnings and progress bars; no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith(("stopped by", "error:"))]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def record_results(monkeypatch, module, name: str) -> list:
    """Wrap `module.name` so that every value it returns is also appended to the returned list."""
    results: list = []
    original = getattr(module, name)

    def recording(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, name, recording)
    return results
