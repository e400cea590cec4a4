"""What the library's thread policy does for a Python script: 20 forward passes of the embedded model.

Each run is a fresh Python process (the wait policy is read once, when torch loads):

- `torch defaults`: torch imported first and the model loaded with transformers, as a script did
  before the library chose threads (one thread per core, idle threads spinning before they sleep);
- `library`: the package imported first and the model loaded with `shared.models.load_causal_lm`,
  which sets OMP_WAIT_POLICY=PASSIVE and torch's threads to the cores free at the load.

Both with no neighbour of ours and beside one busy process (a Python loop this bench starts and
stops), in alternating order over `--rounds` rounds. Timed: the 20 passes after one warm-up pass,
model load excluded. Ends with `python_threads: ratio=X`, the defaults' median time over the
library's beside the busy process.

    python bench/python_threads.py            # ~2-4 min on 2 idle cores; prints one line a run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "Question: Which planet in the solar system has the shortest day, and how long does it last? "
    "Answer: Jupiter has the shortest day of all the planets: it turns once on its axis in just under ten hours."
)
LOADS = {
    "torch defaults": (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from shared.models import embedded_model_dir, load_tokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32).eval()\n"
    ),
    "library": (
        "from shared.models import load_causal_lm, load_tokenizer\n"
        "import torch\n"
        "model = load_causal_lm('smollm2-135m', dtype=torch.float32, device='cpu')\n"
    ),
}
PASSES = (
    "import json, os, time\n"
    "batch = load_tokenizer('smollm2-135m')({text!r}, return_tensors='pt')\n"
    "with torch.no_grad():\n"
    "    model(**batch)\n"
    "    start = time.perf_counter()\n"
    "    for _ in range({passes}):\n"
    "        model(**batch)\n"
    "    seconds = time.perf_counter() - start\n"
    "print(json.dumps({{'seconds': seconds, 'threads': torch.get_num_threads(), 'tokens': batch['input_ids'].shape[1],"
    " 'wait': os.environ.get('OMP_WAIT_POLICY', 'unset')}}))\n"
)


def run_fresh(code: str, settings: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh Python process that sees the project and none of this process's
    OpenMP/MKL settings (`settings` adds some); return the JSON of its last line of output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(settings or {})
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed_run(variant: str, passes: int) -> dict:
    return run_fresh(LOADS[variant] + PASSES.format(text=TEXT, passes=passes))


def load_average() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def alternating_runs(
    conditions: dict[str, str | None], variants: Sequence[str], rounds: int, run: Callable[[str], dict]
) -> Iterator[tuple[str, str, dict, str, str | None]]:
    """`run(variant)` for each variant, `rounds` times in each condition, the variants' order reversed
    every other round. A condition names the Python code of a neighbour process started 1 s before
    each run (so that it holds its core when the run samples the free cores) and stopped after it;
    None runs alone. Yields (condition, variant, the run's result, the load average before it, what
    the neighbour printed when stopped, or None without one)."""
    for condition, neighbour_code in conditions.items():
        for round_ in range(rounds):
            for variant in variants if round_ % 2 == 0 else list(reversed(variants)):
                neighbour = None
                if neighbour_code is not None:
                    neighbour = subprocess.Popen(
                        [sys.executable, "-c", neighbour_code], stdout=subprocess.PIPE, text=True
                    )
                    time.sleep(1.0)
                load = load_average()
                try:
                    result = run(variant)
                finally:
                    said = None
                    if neighbour is not None:
                        neighbour.terminate()
                        said = neighbour.communicate()[0]
                yield condition, variant, result, load, said


def print_medians(times: dict[tuple[str, str], list[float]]) -> None:
    for (condition, variant), seconds in times.items():
        print(f"median, {condition}, {variant}: {statistics.median(seconds):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="Runs of each variant in each condition.")
    parser.add_argument("--passes", type=int, default=20, help="Timed forward passes per run.")
    args = parser.parse_args()
    times: dict[tuple[str, str], list[float]] = {}
    conditions = {"no neighbour": None, "one busy process": "while True: pass"}
    for condition, variant, result, load, _ in alternating_runs(
        conditions, list(LOADS), args.rounds, lambda variant: timed_run(variant, args.passes)
    ):
        times.setdefault((condition, variant), []).append(result["seconds"])
        print(
            f"{condition}, {variant}: {result['seconds']:.2f} s for {args.passes} passes of "
            f"{result['tokens']} tokens ({result['threads']} threads, OMP_WAIT_POLICY {result['wait']}; "
            f"load before {load})",
            flush=True,
        )
    print_medians(times)
    busy = [statistics.median(times[("one busy process", variant)]) for variant in LOADS]
    print(f"python_threads: ratio={busy[0] / busy[1]:.2f}")


if __name__ == "__main__":
    main()
