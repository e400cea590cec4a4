"""bench/scale.py in a small CPU run: each shape's row holds every figure, and the bytes add up."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers.processes import ROOT, subprocess_env

ROW = re.compile(
    r"smollm2-135m: (?P<params>[\d.]+)B parameters, (?P<tokens>[\d,]+) tokens; bare forward [\d,]+ tok/s, "
    r"recording [\d,]+ tok/s \((?P<ratio>[\d.]+)\), (?P<gb>[\d.]+) GB written; "
    r"ica global (?P<global>[\d.]+) min / [\d.]+ GB, ica per-layer (?P<layer>[\d.]+) min / [\d.]+ GB, "
    r"ica no-cache (?P<live>[\d.]+) min / [\d.]+ GB; "
    r"masked LoRA step (?P<step>[\d.]+) s$"
)


@pytest.mark.slow  # about 2 min: the embedded model's shape with random weights, two ica processes
def test_cpu_run_prints_a_row_per_shape_and_the_ratio() -> None:
    command = [sys.executable, "bench/scale.py", "--cpu", "--shapes", "smollm2-135m", "--tokens", "400"]
    done = subprocess.run(
        [*command, "--repeats", "1", "--components", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    row = ROW.match(lines[-2])
    assert row, lines[-2]
    assert abs(float(row["params"]) - 0.13) < 0.01  # SmolLM2-135M's shape (tied embeddings)
    tokens = int(row["tokens"].replace(",", ""))
    assert tokens == 400
    payload_gb = tokens * 30 * 1536 * 2 / 1e9  # float16 values of every layer's neurons
    assert payload_gb <= float(row["gb"]) < 1.5 * payload_gb + 0.01
    assert all(float(row[name]) > 0 for name in ("global", "layer", "live", "step"))
    assert lines[-1] == f"scale: ratio={float(row['ratio']):.3f}"
