"""What OpenMP's wait policy costs the forward pass: on an idle machine, and beside a neighbour that
arrived after the thread count was chosen (the one case the policy decides: a neighbour present at
the start gets one thread from the library, and one thread never waits for another).

Each run is a fresh Python process (libgomp reads its settings once, when torch loads) that imports
the project first, as the commands do, and times 20 forward passes of the embedded model over a
batch of 8 sequences after one warm-up pass, model load excluded, with OMP_NUM_THREADS = the usable
cores. Settings, in alternating order over `--rounds` rounds:

- `PASSIVE`: what the commands and the library set (a thread without work sleeps at once);
- `PASSIVE, 3000 spins`: the same with `GOMP_SPINCOUNT=3000` (a short spin before the sleep);
- `libgomp default`: `OMP_WAIT_POLICY` empty, which libgomp reads as unset (300,000 spins).

"beside a busy process" starts a Python loop 1 s before the run and reports its own rate, so the
cost to the neighbour shows too. Ends with `wait_policy: ratio=X`: PASSIVE's median time over the
short spin's on the idle machine (above 1: the spin is faster there); read it with the busy lines.

    python bench/wait_policy.py [--rounds 2] [--passes 20]   # ~3-4 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import os
import statistics

from python_threads import TEXT, alternating_runs, print_medians, run_fresh  # the same model, text, loop, process

SETTINGS = {
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "PASSIVE, 3000 spins": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"},
    "libgomp default": {"OMP_WAIT_POLICY": ""},
}
RUN = (
    "import shared\n"  # the project first, as the commands
    "import json, time, torch\n"
    "from shared.models import load_causal_lm, load_tokenizer\n"
    "model = load_causal_lm('smollm2-135m', dtype=torch.float32, device='cpu')\n"
    "batch = load_tokenizer('smollm2-135m')([{text!r}] * 8, return_tensors='pt')\n"
    "with torch.inference_mode():\n"
    "    model.base_model(**batch)\n"
    "    start = time.perf_counter()\n"
    "    for _ in range({passes}):\n"
    "        model.base_model(**batch)\n"
    "    seconds = time.perf_counter() - start\n"
    "print(json.dumps({{'seconds': seconds, 'threads': torch.get_num_threads()}}))\n"
)
NEIGHBOUR = (
    "import signal, sys, time\n"
    "n, start = 0, time.perf_counter()\n"
    "signal.signal(signal.SIGTERM, lambda *_: (print(n / (time.perf_counter() - start) / 1e6), sys.exit(0)))\n"
    "while True:\n"
    "    n += 1\n"
)


def timed_run(setting: str, passes: int) -> dict:
    threads = {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}
    return run_fresh(RUN.format(text=TEXT, passes=passes), {**threads, **SETTINGS[setting]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="Runs of each setting in each condition.")
    parser.add_argument("--passes", type=int, default=20, help="Timed forward passes per run.")
    args = parser.parse_args()
    times: dict[tuple[str, str], list[float]] = {}
    for condition, setting, result, _, said in alternating_runs(
        {"idle": None, "beside a busy process": NEIGHBOUR},
        list(SETTINGS),
        args.rounds,
        lambda setting: timed_run(setting, args.passes),
    ):
        rate = "" if said is None else f"; the neighbour {float(said):.1f} M loops/s"
        times.setdefault((condition, setting), []).append(result["seconds"])
        print(
            f"{condition}, {setting}: {result['seconds']:.2f} s for {args.passes} passes "
            f"({result['threads']} threads{rate})",
            flush=True,
        )
    print_medians(times)
    idle = {setting: statistics.median(times[("idle", setting)]) for setting in SETTINGS}
    print(f"wait_policy: ratio={idle['PASSIVE'] / idle['PASSIVE, 3000 spins']:.2f}")


if __name__ == "__main__":
    main()
