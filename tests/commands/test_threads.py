"""The console scripts' thread defaults: OpenMP threads that sleep when idle and no more of them
than the cores left free, chosen before torch loads; a user's own settings always win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import shared.threads as threads
from tests.helpers.processes import ROOT, subprocess_env


def _steady(busy_per_window: int) -> list[tuple[int, int]]:
    """/proc/stat's (busy, total) jiffies at the start and at the end of each of free_cores's windows,
    with the same busy jiffies (of 200) in each window."""
    return [(busy_per_window * window, 200 * window) for window in range(threads.SAMPLE_WINDOWS + 1)]


@pytest.fixture
def two_cores(monkeypatch) -> list[tuple[int, int]]:
    """A 2-core machine whose /proc/stat reads (busy, total) from the list, in order."""
    samples: list[tuple[int, int]] = []
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "_cpu_times", lambda: samples.pop(0) if samples else None)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(threads, "_chosen", {})
    monkeypatch.setattr(threads, "_busy_seen", [])
    monkeypatch.setattr(threads, "_command_chose", False)
    return samples


def test_free_cores_are_the_cores_others_leave_idle(two_cores: list[tuple[int, int]]) -> None:
    two_cores += _steady(10)  # 5% busy: idle
    assert threads.free_cores() == 2
    two_cores += _steady(100)  # one core's worth busy: a neighbour
    assert threads.free_cores() == 1
    two_cores += _steady(200)  # everything busy: still one thread
    assert threads.free_cores() == 1
    assert threads.free_cores() == 2  # no /proc/stat: every core, as before


def test_a_burst_in_one_part_of_the_sample_costs_no_thread(two_cores: list[tuple[int, int]]) -> None:
    two_cores += [(0, 0), (200, 200), (210, 400), (220, 600)]  # both cores busy in the first window only
    assert threads.free_cores() == 2 and threads._busy_seen == [0.1]
    two_cores += [(0, 0), (200, 200), (300, 400), (500, 600)]  # busy throughout, one core at the least
    assert threads.free_cores() == 1 and threads._busy_seen == [1.0]


def test_defaults_are_set_only_where_the_user_set_nothing(two_cores: list[tuple[int, int]], monkeypatch) -> None:
    two_cores += _steady(100)
    environ: dict[str, str] = {}
    assert threads.set_thread_defaults(environ) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    assert threads.thread_note(environ) == (
        "threads: OMP_NUM_THREADS=1 (1 of 2 usable cores free: other processes kept 1.0 cores busy throughout the "
        "0.1 s before the start); OMP_WAIT_POLICY=PASSIVE; set these variables yourself to choose"
    )
    mine = {"OMP_NUM_THREADS": "2"}
    assert threads.set_thread_defaults(mine) == {"OMP_WAIT_POLICY": "PASSIVE"} and mine["OMP_NUM_THREADS"] == "2"
    both = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
    monkeypatch.setattr(threads, "_chosen", {})
    assert threads.set_thread_defaults(both) == {} and both == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.thread_note(both) == (
        "threads: OMP_NUM_THREADS=2 (set by you); OMP_WAIT_POLICY=ACTIVE (set by you); set these variables "
        "yourself to choose"
    )


@pytest.mark.parametrize("module", ["fn_analyze.cli", "fn_train.cli"])
def test_the_console_scripts_set_them_before_torch_loads(module: str) -> None:
    code = (
        "import os, sys\n"
        "sys.argv = ['x', '--help']\n"
        f"from {module} import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("OMP_")}
    for given, expected in (({}, None), ({"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE 3 False")):
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env={**env, **given}, capture_output=True, text=True, check=True
        )
        policy, count, torch_loaded = done.stdout.split()[-3:]
        assert torch_loaded == "False"  # nothing read the settings before they were made
        if expected is None:
            assert policy == "PASSIVE" and 1 <= int(count) <= len(os.sched_getaffinity(0))
        else:
            assert " ".join((policy, count, torch_loaded)) == expected
