"""Do the networks come back? Three figures on real activations, each a one-to-one matching
of two mask files (fn_analyze.report.compare): the share of networks matched at an IoU level, out of
the larger file's count.

- seeds:   the same activations, `--seed 0` against `--seed 1` (IoU >= 0.8; goal >= 90%);
- threads: the same activations and seed, 1 thread against 2 (IoU >= 0.9; goal >= 95%),
           the closest stand-in for another machine;
- halves:  the dataset's even and odd records, collected and analysed apart (IoU >= 0.5; goal >= 70%).

Every `ica` and `collect` runs as its own process (`python -m fn_analyze.cli`), so the thread
count is set before torch and numpy load. Extra `ica` flags go after `--`.

    python bench/reproducibility.py --activations runs/acts --dataset demo/data.jsonl [--work runs/repro] \
        [--model smollm2-135m] [-- --n-components 20]

Ends with one line `reproducibility: ratio=X`, X the seed-to-seed share at IoU >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from fn_analyze.report.compare import REPRODUCED_AT, format_reproduced, iou_matrix, reproduced
from shared.constants import MANIFEST_NAME
from shared.masks import load_mask_file

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def fn_analyze(args: list[str], threads: int) -> float:
    """Run one fn-analyze command in its own process with `threads` threads; its wall seconds."""
    env = {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads)), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fn_analyze.cli", *args], check=True, env=env)
    return time.perf_counter() - start


def ica(activations: Path, out: Path, seed: int, threads: int, extra: list[str]) -> Path:
    if not out.exists():
        args = ["ica", "--activations", str(activations), "--out", str(out), "--seed", str(seed), "--no-register"]
        seconds = fn_analyze([*args, "--overwrite", *extra], threads)
        print(f"  ica seed {seed}, {threads} thread(s): {seconds:.0f} s -> {out}", flush=True)
    return out


def halves(dataset: Path, work: Path) -> tuple[Path, Path]:
    """The dataset's even and odd records (jsonl), as two files."""
    lines = [line for line in dataset.read_text(encoding="utf-8").splitlines() if line.strip()]
    even, odd = work / "even.jsonl", work / "odd.jsonl"
    even.write_text("\n".join(lines[0::2]) + "\n", encoding="utf-8")
    odd.write_text("\n".join(lines[1::2]) + "\n", encoding="utf-8")
    return even, odd


def figure(name: str, a: Path, b: Path, level: float) -> float:
    figures = reproduced(iou_matrix(load_mask_file(a), load_mask_file(b)), (level, *REPRODUCED_AT))
    print(f"{name}: {format_reproduced(figures)}")
    return float(figures[f"{level:g}"]["share"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", type=Path, required=True, help="activations of the whole dataset")
    parser.add_argument("--dataset", type=Path, required=True, help="the jsonl file they were collected from")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", type=Path, default=Path("runs/repro"), help="reused: finished files are kept")
    parser.add_argument("extra", nargs="*", help="flags for every `fn-analyze ica` (after --)")
    args = parser.parse_args()
    if args.dataset.suffix != ".jsonl":
        parser.error("--dataset must be a .jsonl file (its records are split into even and odd)")
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"ica flags: {' '.join(args.extra) or '(defaults)'}; files in {args.work}", flush=True)

    seed0 = ica(args.activations, args.work / "seed0.json", 0, 2, args.extra)
    seed1 = ica(args.activations, args.work / "seed1.json", 1, 2, args.extra)
    one_thread = ica(args.activations, args.work / "seed0-1thread.json", 0, 1, args.extra)
    parts = []
    for half in halves(args.dataset, args.work):
        acts = args.work / f"acts-{half.stem}"
        if not (acts / MANIFEST_NAME).exists():
            collect = ["collect", "--model", args.model, "--dataset", str(half), "--out", str(acts), "--overwrite"]
            print(f"  collect {half.name}: {fn_analyze(collect, 2):.0f} s", flush=True)
        parts.append(ica(acts, args.work / f"{half.stem}.json", 0, 2, args.extra))

    for path in (seed0, seed1, one_thread, *parts):
        mask = load_mask_file(path)
        print(f"{path.name}: {len(mask.networks)} networks, k={mask.source['ica'].get('n_components')}")
    seeds = figure("seeds (0 vs 1)", seed0, seed1, 0.8)
    threads = figure("threads (1 vs 2)", one_thread, seed0, 0.9)
    halves_share = figure("halves (even vs odd records)", *parts, 0.5)
    print(f"seeds_share_iou_0.8: {seeds:.3f}")
    print(f"threads_share_iou_0.9: {threads:.3f}")
    print(f"halves_share_iou_0.5: {halves_share:.3f}")
    print(f"reproducibility: ratio={seeds:.3f}")


if __name__ == "__main__":
    main()
