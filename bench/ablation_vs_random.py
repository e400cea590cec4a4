"""How much more does ablating a mask file's networks hurt than ablating random neurons?

Answer-token loss of the model on question/answer data: at baseline, with the union of the
networks switched off (mode key), and with random neurons switched off in the same
per-layer counts (several seeded draws). With --activations, the same again leaving the
`--top` largest-magnitude neurons out of both the networks and the random draws, since a
few "massive activation" neurons can carry much of a network's measured effect.

    python bench/ablation_vs_random.py --mask-file mask_artifacts/smollm2-demo.json \
        --data demo/eval.csv --activations runs/acts

Ends with one line `ablation_vs_random: ratio=X` (extra loss of the networks over the
extra loss of random sets; the magnitude-controlled ratio is printed above it).
`fn-analyze evaluate` is meant to make this a command; this is the measurement until then.
"""

from __future__ import annotations

import argparse
import csv

import numpy as np
import torch

from fn_analyze.activations import open_activations
from shared.hooks import apply_mask
from shared.masks import MaskFile, Network, load_mask_file
from shared.models import load_causal_lm, load_tokenizer


def answer_batches(model_name: str, path: str, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokenizer = load_tokenizer(model_name)
    batches = []
    for row in list(csv.DictReader(open(path, encoding="utf-8")))[:limit]:
        prompt = [{"role": "user", "content": row["question"]}]
        full = prompt + [{"role": "assistant", "content": row["answer"]}]
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        full_ids = tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
        n_prompt = len(prompt_ids["input_ids"])
        labels = [-100] * n_prompt + full_ids[n_prompt:]
        batches.append((torch.tensor([full_ids]), torch.tensor([labels])))
    return batches


def answer_loss(model, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in batches:
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


def loss_without(model, batches, mask: MaskFile, layers: dict[int, tuple[int, ...]]) -> float:
    with apply_mask(model, MaskFile(mask.model, (Network(0, layers),), {}), "key"):
        return answer_loss(model, batches)


def random_like(layers, size: int, excluded: set[tuple[int, int]], rng) -> dict[int, tuple[int, ...]]:
    drawn = {}
    for layer, neurons in layers.items():
        pool = [n for n in range(size) if (layer, n) not in excluded]
        drawn[layer] = tuple(sorted(rng.choice(pool, len(neurons), replace=False).tolist()))
    return drawn


def compare(model, batches, mask, union, excluded, draws, seed, base) -> tuple[float, float, float]:
    kept = {layer: tuple(n for n in ns if (layer, n) not in excluded) for layer, ns in union.items()}
    kept = {layer: ns for layer, ns in kept.items() if ns}
    networks = loss_without(model, batches, mask, kept)
    rng = np.random.default_rng(seed)
    size = mask.model.intermediate_size
    randoms = [loss_without(model, batches, mask, random_like(kept, size, excluded, rng)) for _ in range(draws)]
    ratio = (networks - base) / (float(np.mean(randoms)) - base)
    print(
        f"  networks ({sum(map(len, kept.values()))} neurons): loss {networks:.3f}; "
        f"random, same per-layer counts ({draws} draws): {np.mean(randoms):.3f} ± {np.std(randoms):.3f}; "
        f"extra-loss ratio {ratio:.2f}"
    )
    return networks, float(np.mean(randoms)), ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mask-file", required=True)
    parser.add_argument("--data", required=True, help="csv with question,answer")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--activations", help="activations folder, for the magnitude control")
    parser.add_argument("--top", type=int, default=100, help="largest-magnitude neurons left out in the control")
    parser.add_argument("--limit", type=int, default=100, help="rows of --data used")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    mask = load_mask_file(args.mask_file)
    model = load_causal_lm(args.model, torch.float32, torch.device("cpu"))
    batches = answer_batches(args.model, args.data, args.limit)
    union: dict[int, set[int]] = {}
    for network in mask.networks:
        for layer, neurons in network.layers.items():
            union.setdefault(layer, set()).update(neurons)
    union_sorted = {layer: tuple(sorted(ns)) for layer, ns in union.items()}
    base = answer_loss(model, batches)
    print(f"baseline answer loss on {len(batches)} rows: {base:.3f}")
    print("all neurons eligible:")
    _, _, ratio = compare(model, batches, mask, union_sorted, set(), args.draws, args.seed, base)
    if args.activations:
        acts = open_activations(args.activations)
        peak = np.zeros(acts.n_neurons)
        for block in acts.blocks(2048):
            peak = np.maximum(peak, np.abs(block).max(axis=0))
        top = {acts.column_to_neuron(int(c)) for c in np.argsort(peak)[::-1][: args.top]}
        held = sum(1 for layer, ns in union.items() for n in ns if (layer, n) in top)
        print(f"the networks hold {held} of the {args.top} largest-magnitude neurons (max |act.| {peak.max():.0f})")
        print(f"leaving those {args.top} out of networks and random draws:")
        compare(model, batches, mask, union_sorted, top, args.draws, args.seed, base)
    print(f"ablation_vs_random: ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
