"""What does pruning buy and cost? The embedded model pruned to 0.5, 0.7 and 0.9 of its MLP neurons per
layer (the mask file's networks kept first, then FLAP importance, means folded into the bias), next to
the original, to a random pruning of the same count per layer and to the same count per layer kept by
importance alone (the networks not kept first: what keeping them adds), all compensated alike, in one run.

Per keep: parameters; tokens/s of a forward pass (a fixed batch of token ids, logits of the last
position only as in a prefill; the original and the pruned model timed in alternating rounds so both
see the same load, `fn_analyze.prune.prefill_speed` as `evaluate --pruned` times them; median of the
rounds' ratios);
answer loss on the demo's held-out rows and accuracy on its sentiment classification rows (net: the
networks first, then importance; rand: random; imp: importance alone).

    python bench/prune.py --activations runs/acts --data demo/eval.csv --accuracy-data demo/sentiment.csv

Ends with one line `prune_speedup: ratio=X`: tokens/s of the keep-0.7 model over the original's.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch

from fn_analyze.measure.scoring import load_eval_set, make_batches, score
from fn_analyze.neurons.magnitude import stats_from_activations, stats_from_forward
from fn_analyze.prune.importance import MOMENTS, importance
from fn_analyze.prune.prefill_speed import prefill_speed
from fn_analyze.prune.pruning import choose_at_random, choose_by_importance, keep_count, prune_model
from shared.arch import find_down_projections
from shared.masks import load_mask_file, union
from shared.models import load_causal_lm, load_tokenizer, model_info


def scores(model, tokenizer, loss_batches, choices) -> tuple[float, float | None]:
    loss = score(model, tokenizer, loss_batches, False, 0)[0].loss
    accuracy = score(model, tokenizer, choices[1], False, 0, choices)[0].accuracy if choices else None
    return loss, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mask-file", default="mask_artifacts/smollm2-demo.json")
    parser.add_argument("--activations", default=None, help="activations folder to rank on (default: --data)")
    parser.add_argument("--data", default="demo/eval.csv")
    parser.add_argument("--accuracy-data", default="demo/sentiment.csv", help="multiple-choice rows, for accuracy")
    parser.add_argument("--keeps", default="0.5,0.7,0.9")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per forward pass of the speed test")
    parser.add_argument("--length", type=int, default=256, help="tokens per row of the speed test")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start", flush=True)

    model = load_causal_lm(args.model, torch.float32, "cpu")
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "right"
    projections = find_down_projections(model)
    info = model_info(model, args.model, projections)
    mask = load_mask_file(args.mask_file)
    loss_set = load_eval_set(args.data, tokenizer, limit=args.limit)
    loss_batches = make_batches(loss_set, 16, tokenizer.pad_token_id)
    choices = None
    if args.accuracy_data:
        accuracy_set = load_eval_set(args.accuracy_data, tokenizer, limit=args.limit)
        if accuracy_set.choices is not None:
            choices = (accuracy_set.choices, make_batches(accuracy_set.choices, 16, tokenizer.pad_token_id))
    started = time.perf_counter()
    if args.activations:
        moments = stats_from_activations(args.activations, info, MOMENTS, cache=True)
    else:
        moments = stats_from_forward(model.base_model, projections, loss_batches, f"a pass over {args.data}", MOMENTS)
    print(f"moments from {moments.source} in {time.perf_counter() - started:.1f} s", flush=True)
    scores_of = importance(moments, projections, compensated=True)
    protected = union(mask.networks)
    ids = torch.randint(
        100, model.config.vocab_size, (args.batch_size, args.length), generator=torch.Generator().manual_seed(0)
    )
    params = sum(p.numel() for p in model.parameters())
    base_loss, base_accuracy = scores(model, tokenizer, loss_batches, choices)
    print(f"original: {params:,} parameters, loss {base_loss:.4f}, accuracy {base_accuracy}", flush=True)

    header = (
        f"{'keep':>5} {'neurons':>8} {'parameters':>12} {'tok/s orig':>11} {'tok/s pruned':>13} {'speedup':>8} "
        f"{'loss net':>9} {'loss rand':>10} {'loss imp':>9} {'acc net':>8} {'acc rand':>9} {'acc imp':>8}"
    )
    rows, speedups = [], {}
    for keep in (float(k) for k in args.keeps.split(",")):
        n_keep = keep_count(keep, info.intermediate_size)
        kept = choose_by_importance(scores_of, protected, n_keep)
        drawn = choose_at_random(info.n_layers, info.intermediate_size, n_keep, {}, args.seed)
        alone = choose_by_importance(scores_of, {}, n_keep)
        pruned, control, by_importance = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
        prune_model(pruned, kept.kept, moments.need("mean"))
        prune_model(control, drawn.kept, moments.need("mean"))
        prune_model(by_importance, alone.kept, moments.need("mean"))
        speed = prefill_speed({"original": model, "pruned": pruned}, ids, torch.ones_like(ids), args.rounds, "original")
        ratio = speedups[keep] = speed["speedup"]["pruned"]
        rates = speed["tokens_per_second"]
        loss, accuracy = scores(pruned, tokenizer, loss_batches, choices)
        random_loss, random_accuracy = scores(control, tokenizer, loss_batches, choices)
        alone_loss, alone_accuracy = scores(by_importance, tokenizer, loss_batches, choices)
        row = (
            f"{keep:>5.2f} {n_keep:>8} {sum(p.numel() for p in pruned.parameters()):>12,} "
            f"{rates['original']:>11.0f} {rates['pruned']:>13.0f} "
            f"{ratio:>8.3f} {loss:>9.4f} {random_loss:>10.4f} {alone_loss:>9.4f} "
            f"{accuracy if accuracy is None else f'{accuracy:.3f}':>8} "
            f"{random_accuracy if random_accuracy is None else f'{random_accuracy:.3f}':>9} "
            f"{alone_accuracy if alone_accuracy is None else f'{alone_accuracy:.3f}':>8}"
        )
        rows.append(row)
        networks_cut = sum(kept.networks_cut.values())
        print(f"{row}   (networks' neurons cut: {networks_cut})", flush=True)
        del pruned, control, by_importance
    print(f"original loss {base_loss:.4f}, accuracy {base_accuracy}; load average {os.getloadavg()[0]:.1f} at end")
    print(header)
    print("\n".join(rows))
    print(f"prune_speedup: ratio={speedups.get(0.7, np.nan):.3f}")


if __name__ == "__main__":
    main()
