"""The checks `bench/gpu_check.sh` runs between its commands, one subcommand each.

    python bench/gpu_check.py tiny-model DIR           # a tiny LLaMA for the CPU smoke mode
    python bench/gpu_check.py same-networks A.json B.json
    python bench/gpu_check.py masked-adapter OUTPUT_DIR

Each prints `name: value` lines and exits 1 when its check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from collect_vs_forward import tiny_model_dir
from safetensors.torch import load_file

from fn_analyze.report.compare import iou_matrix
from fn_train.run_mask import run_mask_from_record
from shared.constants import ADAPTER_WEIGHTS_NAME, RUN_MASK_NAME
from shared.masks import load_mask_file

MATCH_IOU = 0.9  # a stable network comes back when its best match reaches this IoU
# LoRA matrices of LLaMA-style MLPs (the embedded model and the tiny one): layer, module, A or B.
LORA_KEY = re.compile(r"layers\.(\d+)\.mlp\.(down_proj|up_proj|gate_proj)\.lora_([AB])\.weight$")


def same_networks(first: Path, second: Path) -> bool:
    """Whether the stable networks of `first` come back in `second` (IoU >= MATCH_IOU, the
    threads criterion of the reproducibility bench).

    Neuron-for-neuron identity is printed too, but a CUDA reduction (float32 kernels) and a CPU
    one do not round alike, so across devices the networks agree by IoU, not bit for bit.
    """
    a, b = load_mask_file(first), load_mask_file(second)
    best = iou_matrix(a, b).max(axis=1) if a.networks and b.networks else np.zeros(len(a.networks))
    stable = [i for i, network in enumerate(a.networks) if network.stats.get("stable", True)]
    matched = sum(best[i] >= MATCH_IOU for i in stable)
    identical = sum(any(x.layers == y.layers for y in b.networks) for x in a.networks)
    print(f"networks: {len(a.networks)} and {len(b.networks)}")
    print(f"identical_networks: {identical}/{max(len(a.networks), len(b.networks))}")
    print(f"stable_networks_matched: {matched}/{len(stable)}")
    print("stable_network_ious: " + ",".join(f"{best[i]:.3f}" for i in stable))
    return matched == len(stable) > 0


def masked_adapter(output_dir: Path) -> bool:
    """Whether a LoRA run with a mask left every masked neuron's LoRA entries at zero (its column of
    the down-projection's A, its rows of the up/gate projections' B: so B @ A never moves the
    neuron's parameters) while some open entry of B trained."""
    record = json.loads((output_dir / RUN_MASK_NAME).read_text(encoding="utf-8"))
    vectors = run_mask_from_record(record, str(output_dir)).layer_masks.vectors
    masked = {layer: (vector == 0).nonzero().flatten() for layer, vector in vectors.items()}
    checked, moved, failures = 0, False, []
    for key, weight in load_file(output_dir / ADAPTER_WEIGHTS_NAME).items():
        found = LORA_KEY.search(key)
        if found is None:
            continue
        layer, module, which = int(found.group(1)), found.group(2), found.group(3)
        neurons = masked.get(layer)
        if module == "down_proj" and which == "A" and neurons is not None and len(neurons):
            checked += 1
            failures += [key] if weight[:, neurons].count_nonzero() else []
        if module != "down_proj" and which == "B":
            moved |= bool(weight.count_nonzero())
            if neurons is not None and len(neurons):
                checked += 1
                failures += [key] if weight[neurons].count_nonzero() else []
    print(f"masked_neurons: {sum(len(n) for n in masked.values())}")
    print(f"masked_lora_matrices_checked: {checked}")
    print(f"masked_parameters_unchanged: {str(not failures and checked > 0).lower()}")
    print(f"open_parameters_trained: {str(moved).lower()}")
    for key in failures:
        print(f"moved: {key}", file=sys.stderr)
    return not failures and checked > 0 and moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("tiny-model").add_argument("folder", type=Path)
    same = commands.add_parser("same-networks")
    same.add_argument("first", type=Path)
    same.add_argument("second", type=Path)
    commands.add_parser("masked-adapter").add_argument("output_dir", type=Path)
    args = parser.parse_args()
    if args.command == "tiny-model":
        print(tiny_model_dir(args.folder))
        return
    ok = same_networks(args.first, args.second) if args.command == "same-networks" else masked_adapter(args.output_dir)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
