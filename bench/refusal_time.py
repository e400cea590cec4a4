"""How long does a bad input wait for its refusal? Each command run on a bad path, column or flag,
in a fresh interpreter, against the baseline of what a refusal used to wait for: importing torch,
transformers and datasets in a fresh interpreter.

A round runs every case once and the baseline once, back to back, so that both see the same load;
the figure is the median over rounds of (median refusal time / baseline time).

    python bench/refusal_time.py [--rounds 3]

Ends with one line `refusal_time: ratio=X` (below 1: refused before the heavy imports would have ended).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cases(folder: Path) -> dict[str, list[str]]:
    qa, columns = folder / "qa.jsonl", folder / "cols.csv"
    qa.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    columns.write_text("q,a\nwhat,that\n")
    missing = str(folder / "missing.jsonl")
    analyze, train = ["-m", "fn_analyze.cli"], ["-m", "fn_train.cli"]
    return {
        "collect, missing data file": [*analyze, "collect", "--dataset", missing, "--out", "acts"],
        "collect, columns of no format": [*analyze, "collect", "--dataset", str(columns), "--out", "acts"],
        "collect, unknown flag": [*analyze, "collect", "--dataset", str(qa), "--out", "acts", "--bogus"],
        "ica, missing activations": [*analyze, "ica", "--activations", "none", "--out", "m.json"],
        "evaluate, missing mask file": [*analyze, "evaluate", "--mask-file", "none.json", "--dataset", str(qa)],
        "fn-train, columns of no format": [*train, "--dataset_name_or_path", str(columns), "--output_dir", "o"],
        "fn-train, wrong --data_format": [
            *train,
            "--dataset_name_or_path",
            str(qa),
            "--output_dir",
            "o",
            "--data_format",
            "alpaca",
        ],  # fmt: skip
    }


def _seconds(args: list[str], folder: Path, expect_refusal: bool) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if (done.returncode == 2) != expect_refusal:
        raise SystemExit(f"{args}: exit {done.returncode}: {done.stderr[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    baseline = ["-c", "import torch, transformers, datasets"]
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = _cases(folder)
        for index in range(rounds):
            heavy = _seconds(baseline, folder, expect_refusal=False)
            times = {name: _seconds(args, folder, expect_refusal=True) for name, args in cases.items()}
            ratios.append(statistics.median(times.values()) / heavy)
            print(f"round {index}: importing torch, transformers, datasets {heavy:.2f} s")
            for name, seconds in times.items():
                print(f"  {name:<34} refused in {seconds:.2f} s")
    print(f"round ratios (median refusal / heavy imports): {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"refusal_time: ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
