"""The commands' thread policy for Python callers: torch's threads set to the free cores at the first
model load or ICA fit of a process, said at INFO; the user's own settings left alone; the passive wait
set when `shared` is imported before torch."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import shared.threads as threads
from fn_analyze.networks.ica import NetworkICA
from shared.models import load_causal_lm
from tests.helpers.processes import ROOT, subprocess_env

UNTOUCHED = 3  # torch's default thread count in these tests, so that the free cores (1) differ from it


@pytest.fixture
def fresh_process(monkeypatch, caplog) -> None:
    """This process as one that has not chosen yet: torch at its default count, nothing in the
    environment but the passive wait, 2 usable cores of which other processes keep one busy;
    torch's own count restored afterwards."""
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(threads, "_chosen", {})
    monkeypatch.setattr(threads, "_busy_seen", [])
    monkeypatch.setattr(threads, "_torch_threads_decided", False)
    monkeypatch.setattr(threads, "_command_chose", False)
    monkeypatch.setattr(threads, "torch_default_threads", lambda: UNTOUCHED)
    samples = [
        (100 * w, 200 * w) for w in range(threads.SAMPLE_WINDOWS + 1)
    ]  # /proc/stat's (busy, total): one core busy
    monkeypatch.setattr(threads, "_cpu_times", lambda: samples.pop(0) if samples else None)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    torch.set_num_threads(UNTOUCHED)
    caplog.set_level(logging.INFO, logger="shared.threads")
    yield
    torch.set_num_threads(before)


CHOSEN = (
    "threads: 1 torch threads (1 of 2 usable cores free: other processes kept 1.0 cores busy throughout the 0.1 s "
    "before the first model load or fit); OMP_WAIT_POLICY=PASSIVE; set OMP_NUM_THREADS or call "
    "torch.set_num_threads before loading to choose"
)


def _thread_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "shared.threads" and r.levelno == logging.INFO]


def test_the_first_model_load_gives_torch_the_free_cores(fresh_process, tiny_lm_dir: Path, caplog, monkeypatch) -> None:
    load_causal_lm(str(tiny_lm_dir), device="cpu")
    assert torch.get_num_threads() == 1
    assert _thread_lines(caplog) == [CHOSEN]
    monkeypatch.setattr(threads, "free_cores", lambda: 2)
    load_causal_lm(str(tiny_lm_dir), device="cpu")  # chosen once a process: a session's runs keep their count
    assert torch.get_num_threads() == 1 and len(_thread_lines(caplog)) == 1


def test_the_first_ica_fit_gives_torch_the_free_cores(fresh_process, caplog) -> None:
    data = np.random.default_rng(0).normal(size=(300, 24))
    NetworkICA(n_components=2, runs=2, keep_unstable=True).fit(data, layers=[0, 1])
    assert torch.get_num_threads() == 1
    assert _thread_lines(caplog) == [CHOSEN]


def test_threads_that_spin_are_said(fresh_process, tiny_lm_dir: Path, caplog, monkeypatch) -> None:
    """Torch imported before the package: no passive wait, and two threads whose idle spinning the line names."""
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(threads, "free_cores", lambda: 2)
    load_causal_lm(str(tiny_lm_dir), device="cpu")
    assert torch.get_num_threads() == 2
    (line,) = _thread_lines(caplog)
    assert "; idle OpenMP threads spin before they sleep (torch was imported before this package" in line


@pytest.mark.parametrize("variable", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_a_thread_variable_the_user_set_is_left_alone(
    fresh_process, tiny_lm_dir, caplog, monkeypatch, variable
) -> None:
    monkeypatch.setenv(variable, "3")
    load_causal_lm(str(tiny_lm_dir), device="cpu")
    assert torch.get_num_threads() == UNTOUCHED
    assert _thread_lines(caplog) == [f"threads: {variable}=3 set by you, left as it is (3 torch threads)"]


def test_the_users_own_torch_set_num_threads_is_left_alone(fresh_process, caplog) -> None:
    torch.set_num_threads(2)
    NetworkICA(n_components=2, runs=2, keep_unstable=True).fit(np.random.default_rng(0).normal(size=(300, 24)))
    assert torch.get_num_threads() == 2
    assert _thread_lines(caplog) == ["threads: torch.set_num_threads(2) set by you, left as it is"]


def test_a_commands_choice_stands(fresh_process, tiny_lm_dir, caplog, monkeypatch) -> None:
    monkeypatch.setattr(threads, "_command_chose", True)  # as set_thread_defaults leaves it
    load_causal_lm(str(tiny_lm_dir), device="cpu")
    assert torch.get_num_threads() == UNTOUCHED and _thread_lines(caplog) == []


def test_the_passive_wait_is_set_only_before_torch_and_where_the_user_set_none(monkeypatch) -> None:
    monkeypatch.setattr(threads, "_chosen", {})
    environ: dict[str, str] = {}
    threads.passive_wait_unless_set(environ)  # torch is loaded in this process: too late
    assert environ == {}
    monkeypatch.delitem(sys.modules, "torch")
    threads.passive_wait_unless_set(environ)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"} and threads._chosen == {"OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.passive_wait_unless_set(mine)
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE"}


def _fresh_python(code: str) -> str:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("OMP_", "MKL_"))}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_importing_the_package_before_torch_sets_the_passive_wait_and_after_it_does_not() -> None:
    assert _fresh_python("import os, shared, torch; print(os.environ.get('OMP_WAIT_POLICY'))") == "PASSIVE"
    assert _fresh_python("import os, torch, shared; print(os.environ.get('OMP_WAIT_POLICY'))") == "None"


def test_torch_default_threads_is_what_an_untouched_torch_takes() -> None:
    """The rule that tells a user's torch.set_num_threads from torch's default, checked on this machine."""
    untouched = _fresh_python(
        "import torch, shared.threads as t; print(torch.get_num_threads(), t.torch_default_threads())"
    )
    taken, predicted = untouched.split()
    assert taken == predicted
