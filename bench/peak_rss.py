"""Peak memory of `collect` and `ica` at 1x and 4x the tokens: it must not grow with the data.

Each command runs in its own process on the embedded model and demo data; its peak
resident set size comes from the kernel (wait4's ru_maxrss).

    python bench/peak_rss.py [--tokens 2000]

Ends with one line `peak_rss: ratio=X`, the larger of the two 4x/1x ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fn_analyze.demo_data import write_demo_data


def peak_rss_mb(command: list[str]) -> float:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(
            f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:] if process.stderr else ''}"
        )
    return usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000, help="tokens of the 1x run")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    cli = [sys.executable, "-m", "fn_analyze.cli"]
    try:
        data = write_demo_data(work / "demo", seed=0, n_collect=800, n_train=1, n_eval=1)["collect"]
        peaks: dict[str, dict[int, float]] = {"collect": {}, "ica": {}}
        for scale in (1, 4):
            acts = work / f"acts{scale}"
            tokens = str(args.tokens * scale)
            collect = [*cli, "collect", "--dataset", str(data), "--model", args.model, "--out", str(acts)]
            peaks["collect"][scale] = peak_rss_mb([*collect, "--max-tokens", tokens, "--shard-size-mb", "256"])
            ica = [*cli, "ica", "--activations", str(acts), "--out", str(work / f"m{scale}.json"), "--no-register"]
            peaks["ica"][scale] = peak_rss_mb(ica)
        ratios = []
        for stage, by_scale in peaks.items():
            ratio = by_scale[4] / by_scale[1]
            ratios.append(ratio)
            print(
                f"{stage}: peak RSS {by_scale[1]:.0f} MB at {args.tokens} tokens, {by_scale[4]:.0f} MB at "
                f"{4 * args.tokens} tokens -> {ratio:.3f}x"
            )
        print(f"peak_rss: ratio={max(ratios):.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
