"""fn-train steps, collect and evaluate on the embedded model, idle and beside one busy process,
with the thread defaults of the console scripts (shared/threads.py) and without them.

"before" runs the same command with OMP_NUM_THREADS set to every usable core and
GOMP_SPINCOUNT=300000 (libgomp's own spin before a thread sleeps; it overrides the wait
policy), i.e. what a run got before the defaults; "defaults" runs it with neither set, so the
command chooses. The busy neighbour is one Python process spinning on one core.

    python bench/thread_contention.py --out runs/threads     # about 12 minutes at load 7-12 on 2 cores

Prints one line per run (workload, neighbour, settings, seconds, the load average before) and
writes them to <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MASK = ROOT / "mask_artifacts" / "smollm2-demo.json"
BEFORE = {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0))), "GOMP_SPINCOUNT": "300000"}


def workloads(out: Path) -> dict[str, list[str]]:
    """The command lines measured, smallest first; collect's activations feed evaluate."""
    demo = out / "demo"
    return {
        "fn-train, 3 LoRA steps": [
            "fn_train.cli", "--dataset_name_or_path", str(demo / "train.csv"), "--output_dir", str(out / "ft"),
            "--max_steps", "3", "--per_device_train_batch_size", "4", "--max_seq_length", "128",
            "--mask-file", str(MASK), "--networks", "0", "--overwrite_output_dir",
        ],
        "collect, 1,500 tokens": [
            "fn_analyze.cli", "collect", "--dataset", str(demo / "data.jsonl"), "--out", str(out / "acts"),
            "--max-tokens", "1500", "--overwrite",
        ],
        "evaluate, 16 rows x 7 masks": [
            "fn_analyze.cli", "evaluate", "--mask-file", str(MASK), "--dataset", str(demo / "eval.csv"),
            "--activations", str(out / "acts"), "--networks", "0", "--limit", "16", "--draws", "1",
            "--network-draws", "0", "--union-only", "--out", str(out / "eval.json"), "--overwrite",
        ],
    }  # fmt: skip


def run(command: list[str], settings: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env.update(settings, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *command], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/threads"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "fn_analyze.cli", "demo-data", "--out", str(args.out / "demo")], check=True)
    results = []
    for neighbour in ("idle", "one busy process"):
        busy = None
        if neighbour != "idle":
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(2)  # running before the command starts, as a neighbour would be
        try:
            for name, command in workloads(args.out).items():
                for label, settings in (("before (spin, every core)", BEFORE), ("defaults", {})):
                    before = load()
                    seconds = run(command, settings)
                    results.append(
                        {"workload": name, "neighbour": neighbour, "settings": label, "seconds": round(seconds, 1),
                         "load_before": before}
                    )  # fmt: skip
                    print(f"{name:<28} {neighbour:<17} {label:<26} {seconds:6.1f} s   load {before}", flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"written: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
