"""Which preprocessing finds networks that do something beyond their neurons' magnitude?

For one activations folder, model and evaluation dataset: `fn-analyze ica` once per
preprocessing option, then `fn-analyze evaluate` of each mask file in each ablation mode,
each as its own process (`python -m fn_analyze.cli`), and one table:

    option x mode -> networks, union neurons, top-N magnitude neurons held, union off vs
    layer-matched and vs magnitude-matched random (ratio of extra loss), only the union kept
    vs the same (below 1: keeping the networks is better than keeping random neurons), and on
    multiple-choice data the accuracy lost with the union off, next to what the
    magnitude-matched random sets lose; and whether the networks come back (issue "Networks
    that come back"): `halves`, the share of networks whose two disjoint halves of the records
    give the same neurons at IoU >= 0.5 (each mask file's `split_iou`), and with
    `--seed-check` `seeds`, the share matched one to one at IoU >= 0.8 by a second `ica`
    with `--seed 1` (one more `ica` per option).

Options: none (centered only), nopos0 (`--exclude-positions 0`), layer (`--scale layer`),
clip (`--clip-percentile P`), aside (`--set-aside N`). Extra `ica` flags go after `--`.

    python bench/science_sweep.py --activations runs/acts --dataset demo/sentiment.csv [--model smollm2-135m] \
        [--out runs/sweep] [--options none,nopos0,layer,clip,aside] [--modes zero,mean] \
        [--limit 200] [--draws 5] [--seed-check] [-- --n-components 20]

Resumes: a mask file or results file already in --out is not made again (both are written
atomically, so one that exists is whole); --out remembers the settings and refuses others.
Ends with one line `science_sweep: ratio=X`, X the best union-off ratio vs magnitude-matched random.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fn_analyze.report.compare import iou_matrix, reproduced
from shared.masks import load_mask_file

OPTIONS = ("none", "nopos0", "layer", "clip", "aside")
MODES = ("zero", "mean")
SETTINGS_NAME = "sweep_settings.json"


def ica_flags(option: str, args: argparse.Namespace) -> list[str]:
    """The `ica` flags of one preprocessing option, or of several joined by `+` (`layer+aside`)."""
    flags = {
        "none": [],
        "nopos0": ["--exclude-positions", "0"],
        "layer": ["--scale", "layer"],
        "clip": ["--clip-percentile", str(args.clip_percentile)],
        "aside": ["--set-aside", str(args.set_aside)],
    }
    parts = option.split("+")
    # ica sets the massive neurons aside by default (--set-aside auto): every other option turns it off,
    # so that each row changes one thing against no preprocessing at all.
    off = [] if "aside" in parts else ["--set-aside", "0"]
    return [flag for part in parts for flag in flags[part]] + off


def fn_analyze(command: list[str]) -> float:
    """Run one fn-analyze command in its own process; its wall seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fn_analyze.cli", *command], check=True, env={**os.environ})
    return time.perf_counter() - started


def make_mask(option: str, args: argparse.Namespace, seed: int = 0) -> Path:
    """The mask file of one option (ica `--seed`: 0, or 1 for the seed check)."""
    name = option if seed == 0 else f"{option}-seed{seed}"
    out = args.out / "masks" / f"{name}.json"
    if out.exists():
        print(f"  ica {name}: done before, {out}", flush=True)
        return out
    command = ["ica", "--activations", str(args.activations), "--out", str(out), "--no-register", "--overwrite"]
    seconds = fn_analyze([*command, "--seed", str(seed), *ica_flags(option, args), *args.ica_args])
    print(f"  ica {name}: {seconds:.0f} s -> {out}", flush=True)
    return out


HALVES_AT, SEEDS_AT = 0.5, 0.8  # the IoU levels of issue "Networks that come back"


def reproducibility(mask: Path, second_seed: Path | None) -> dict[str, float | None]:
    """`halves`: the share of networks with split_iou >= HALVES_AT (None: no split computed);
    `seeds`: the share matched one to one at IoU >= SEEDS_AT with the second seed's file."""
    mask_file = load_mask_file(mask)
    splits = [network.stats.get("split_iou") for network in mask_file.networks]
    figures: dict[str, float | None] = {"halves": None, "seeds": None}
    if splits and all(iou is not None for iou in splits):
        figures["halves"] = sum(iou >= HALVES_AT for iou in splits) / len(splits)
    if second_seed is not None:
        matrix = iou_matrix(mask_file, load_mask_file(second_seed))
        figures["seeds"] = float(reproduced(matrix, (SEEDS_AT,))[f"{SEEDS_AT:g}"]["share"])
    return figures


def run_evaluate(option: str, mode: str, mask: Path, args: argparse.Namespace) -> Path | None:
    """The results file of one option and mode; None when the mask file holds no network."""
    out = args.out / "eval" / f"{option}-{mode}.json"
    if out.exists():
        print(f"  evaluate {option} {mode}: done before, {out}", flush=True)
        return out
    if not json.loads(mask.read_text(encoding="utf-8"))["networks"]:
        print(f"  evaluate {option} {mode}: skipped, the mask file holds no network", flush=True)
        return None
    command = ["evaluate", "--mask-file", str(mask), "--dataset", args.dataset, "--model", args.model]
    command += ["--activations", str(args.activations), "--ablation", mode, "--out", str(out)]
    command += ["--limit", str(args.limit), "--draws", str(args.draws), "--union-only"]
    command += ["--seed", str(args.seed), "--top-n", str(args.top_n), "--device", args.device]
    seconds = fn_analyze(command)
    print(f"  evaluate {option} {mode}: {seconds:.0f} s -> {out}", flush=True)
    return out


def row_of(option: str, mode: str, mask: Path, results: Path | None, repro: dict[str, float | None]) -> dict[str, Any]:
    """One row of the table from a mask file, its results file (None: nothing measured) and its
    reproducibility figures."""
    networks = json.loads(mask.read_text(encoding="utf-8"))["networks"]
    row: dict[str, Any] = {"option": option, "mode": mode, "networks": len(networks), **repro}
    if results is None:
        return row
    data = json.loads(results.read_text(encoding="utf-8"))
    union = {c["mode"]: c for c in data["conditions"] if c["kind"] == "union"}
    off, kept = union.get("key"), union.get("complement")
    row["neurons"] = off["neurons"] if off else None
    row["top_held"] = off["top_magnitude_held"] if off else None
    for name, condition in (("off", off), ("kept", kept)):
        controls = condition["controls"] if condition else {}
        for control, short in (("layer_matched", "layer"), ("magnitude_matched", "mag")):
            # None where no random sets were drawn or the ratio is not readable (the random sets' extra loss is noise)
            row[f"{name}_{short}"] = controls[control]["ratio"]["value"] if control in controls else None
    base = data["baseline"].get("accuracy")
    if base is not None and off is not None:
        row["acc_base"] = base
        row["acc_drop"] = base - off["accuracy"]
        mag = off["controls"].get("magnitude_matched", {})
        row["acc_drop_mag"] = base - mag["accuracy"] if "accuracy" in mag else None
    return row


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_rows(rows: list[dict[str, Any]], top_n: int) -> str:
    header = (
        f"{'option':<8} {'mode':<5} {'nets':>4} {'neurons':>7} {f'top{top_n}':>6} "
        f"{'off/layer':>9} {'off/mag':>8} {'kept/layer':>10} {'kept/mag':>9} {'acc':>6} {'drop':>6} {'drop mag':>8} "
        f"{'halves':>6} {'seeds':>5}"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"{row['option']:<8} {row['mode']:<5} {row['networks']:>4} {_fmt(row.get('neurons'), 'd'):>7} "
            f"{_fmt(row.get('top_held'), 'd'):>6} {_fmt(row.get('off_layer'), '.2f'):>9} "
            f"{_fmt(row.get('off_mag'), '.2f'):>8} {_fmt(row.get('kept_layer'), '.2f'):>10} "
            f"{_fmt(row.get('kept_mag'), '.2f'):>9} {_fmt(row.get('acc_base'), '.3f'):>6} "
            f"{_fmt(row.get('acc_drop'), '.3f'):>6} {_fmt(row.get('acc_drop_mag'), '.3f'):>8} "
            f"{_fmt(row.get('halves'), '.2f'):>6} {_fmt(row.get('seeds'), '.2f'):>5}"
        )
    lines.append(
        "off: union of the networks switched off; kept: only the union kept. Ratios are extra loss over the random "
        "sets' (layer- or magnitude-matched); off above 1 and kept below 1 favour the networks. acc: baseline "
        "accuracy; drop: accuracy lost with the union off; drop mag: lost by the magnitude-matched random sets. "
        f"halves: share of networks whose halves of the records agree at IoU >= {HALVES_AT}; seeds: share matched "
        f"one to one at IoU >= {SEEDS_AT} by a second seed (--seed-check)."
    )
    return "\n".join(lines)


def check_settings(args: argparse.Namespace) -> None:
    """--out holds one sweep: refuse to resume it with other settings (its files would not match)."""
    settings = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key not in ("out", "options", "modes", "seed_check")
    }
    path = args.out / SETTINGS_NAME
    if path.exists() and json.loads(path.read_text(encoding="utf-8")) != settings:
        sys.exit(f"error: {args.out} holds a sweep of other settings ({path}); give another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    ica_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, ica_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--activations", type=Path, required=True, help="Folder written by `fn-analyze collect`.")
    parser.add_argument("--dataset", required=True, help="Held-out data for evaluate (multiple choice: accuracy).")
    parser.add_argument("--model", default="smollm2-135m", help="The activations' model.")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"), help="Folder of mask and results files.")
    parser.add_argument(
        "--options", default=",".join(OPTIONS), help=f"Subset of {','.join(OPTIONS)}; `a+b` combines two."
    )
    parser.add_argument("--modes", default=",".join(MODES), help="Ablation modes: zero, mean, scale.")
    parser.add_argument("--clip-percentile", type=float, default=99.0, help="P of the clip option.")
    parser.add_argument("--set-aside", type=int, default=100, help="N of the aside option.")
    parser.add_argument("--limit", type=int, default=200, help="Records evaluated.")
    parser.add_argument("--draws", type=int, default=5, help="Random sets per control for the union rows.")
    parser.add_argument("--top-n", type=int, default=100, help="Largest-magnitude neurons counted in each set.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random sets.")
    parser.add_argument("--device", default="auto", help="evaluate's device.")
    parser.add_argument("--seed-check", action="store_true", help="Also run each option's ica with --seed 1.")
    args = parser.parse_args(argv)
    args.ica_args = ica_args
    args.options = [o.strip() for o in args.options.split(",") if o.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [o for o in args.options if any(part not in OPTIONS for part in o.split("+"))]
    if unknown:
        parser.error(f"unknown option {unknown[0]!r}; use some of {', '.join(OPTIONS)}")
    return args


def main(argv: list[str] | None = None) -> float | None:
    args = parse_args(argv)
    check_settings(args)
    rows = []
    for option in args.options:
        mask = make_mask(option, args)
        repro = reproducibility(mask, make_mask(option, args, seed=1) if args.seed_check else None)
        for mode in args.modes:
            rows.append(row_of(option, mode, mask, run_evaluate(option, mode, mask, args), repro))
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(format_rows(rows, args.top_n))
    ratios = [row["off_mag"] for row in rows if row.get("off_mag") is not None]
    best = max(ratios) if ratios else None
    print(f"science_sweep: ratio={'n/a' if best is None else f'{best:.2f}'}")
    return best


if __name__ == "__main__":
    main()
