"""bench/gpu_check.sh in its CPU smoke mode: every step runs on a tiny model and prints its figure."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.processes import ROOT, subprocess_env


@pytest.mark.slow  # about a minute: ten processes, each importing torch
def test_smoke_mode_runs_every_step_and_prints_one_figure_a_line(tmp_path: Path) -> None:
    script = ROOT / "bench" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    env = subprocess_env(FN_CACHE_DIR=str(tmp_path / "cache"), WORK=str(tmp_path / "work"))
    done = subprocess.run([str(script), "--smoke"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert all(re.fullmatch(r"[a-z0-9_]+", name) for name in figures), done.stdout
    assert figures["device"] == "cpu"
    for name in ("collect_vs_forward", "collect_in_loop_vs_forward", "collect_disk_write_mib_s"):
        assert float(figures[f"{name}_float16"]) > 0 and float(figures[f"{name}_bfloat16"]) > 0
    assert float(figures["mask_overhead"]) > 0
    for name in (
        "collect_bfloat16_seconds",
        "ica_reduction_on_device_seconds",
        "ica_reduction_on_cpu_seconds",
        "ica_no_cache_seconds",
        "evaluate_seconds",
        "qlora_3_steps_seconds",
    ):
        assert float(figures[name]) > 0
    identical, total = map(int, figures["ica_device_vs_cpu_identical_networks"].split("/"))
    assert identical == total > 0  # the same device twice: the same networks
    matched, stable = map(int, figures["ica_device_vs_cpu_stable_networks_matched"].split("/"))
    assert matched == stable > 0
    matched, stable = map(int, figures["ica_no_cache_vs_cached_stable_networks_matched"].split("/"))
    assert matched == stable > 0  # the same rows, recomputed instead of read back
    assert figures["qlora_masked_parameters_unchanged"] == "true"
    assert figures["qlora_open_parameters_trained"] == "true"
