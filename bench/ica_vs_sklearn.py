"""The whole `ica` stage against scikit-learn's default FastICA on the same matrix.

A (tokens x neurons) matrix that fits in memory, with --components sparse networks
planted in noise, is written as float16 shards. The baseline is
`FastICA(n_components=k, whiten="unit-variance")` fitted on the neuron-centered matrix
(neurons as samples, as ica does), the float16 values in float32. Ours is `run_ica` end
to end with its defaults (reading the shards, the converged streamed reduction of the
whole data and of its two halves, the consensus of Picard runs on each, the mask file).
Each sklearn map is then matched to the best of ours by |correlation|.

    python bench/ica_vs_sklearn.py [--tokens 20000 --neurons 2048 --components 32]

Ends with one line `ica_vs_sklearn: ratio=X` (sklearn seconds over ours).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.decomposition import FastICA

from fn_analyze.networks.consensus import zscore_and_flip
from fn_analyze.networks.ica import IcaConfig, run_ica, unmix_activations
from fn_analyze.record.activations import open_activations, write_matrix
from shared.masks import ModelInfo


def planted(tokens: int, neurons: int, k: int, seed: int) -> tuple[np.ndarray, list[set[int]]]:
    """Gaussian noise plus k networks of 24 neurons, each sharing a sparse heavy-tailed course."""
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, 1.0, (tokens, neurons)).astype(np.float32)
    order = rng.permutation(neurons)
    networks = []
    for i in range(k):
        course = rng.laplace(0.0, 1.0, tokens) * (rng.random(tokens) < 0.3)
        members = order[i * 24 : (i + 1) * 24]
        data[:, members] += (3.0 * course[:, None] * rng.uniform(1.0, 2.0, len(members))).astype(np.float32)
        networks.append(set(members.tolist()))
    return data, networks


def recovered(maps: np.ndarray, truth: list[set[int]]) -> int:
    """Planted networks matched with IoU >= 0.8 by a map's z >= 3 neurons (signed as ica signs them)."""
    z = zscore_and_flip(maps)
    found = [set(np.flatnonzero(z[:, j] >= 3).tolist()) for j in range(z.shape[1])]
    return sum(max(len(t & f) / len(t | f) for f in found) >= 0.8 for t in truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--neurons", type=int, default=2048)
    parser.add_argument("--components", type=int, default=32)
    parser.add_argument("--runs", type=int, default=IcaConfig.runs, help="consensus runs per view of the data")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ica-"))
    try:
        data, truth = planted(args.tokens, args.neurons, args.components, seed=0)
        layers = [0, 1]
        info = ModelInfo("synthetic", "llama", 2, args.neurons // 2, 8, "sha256:synthetic")
        folder = write_matrix(work / "acts", data, info, layers)
        stored = data.astype(np.float16).astype(np.float32)
        centered = stored - stored.mean(axis=0)
        print(f"matrix: {args.tokens} tokens x {args.neurons} neurons, {args.components} components")

        start = time.perf_counter()
        reference = FastICA(n_components=args.components, whiten="unit-variance", random_state=0).fit_transform(
            centered.T
        )
        sklearn_seconds = time.perf_counter() - start
        print(f"sklearn FastICA(whiten='unit-variance') on the in-memory matrix: {sklearn_seconds:.2f} s")

        config = IcaConfig(
            activations=folder,
            out=work / "mask.json",
            n_components=args.components,
            runs=args.runs,
            register=False,
            device=args.device,
        )
        start = time.perf_counter()
        mask = run_ica(config)
        ours_seconds = time.perf_counter() - start
        print(
            f"fn-analyze ica, whole stage from the shards (consensus of {args.runs} runs on the data and each of "
            f"{config.splits} halves): {ours_seconds:.2f} s"
        )

        # The consensus maps behind the mask, recomputed (same seed) for the comparison, not timed.
        ours = unmix_activations(open_activations(folder), config).chosen.results[0].z
        k = args.components
        match = np.abs(np.corrcoef(reference.T, ours.T)[:k, k:]).max(axis=1)  # ours: one map per cluster
        print(
            f"{len(mask.networks)} networks; sklearn's maps matched by ours: min |corr| {match.min():.3f}, "
            f"median {np.median(match):.3f}, {int((match >= 0.95).sum())}/{k} at >= 0.95"
        )
        print(
            f"planted networks recovered (IoU >= 0.8): sklearn {recovered(reference, truth)}/{k}, "
            f"ours {recovered(ours, truth)}/{k}"
        )
        print(f"ica_vs_sklearn: ratio={sklearn_seconds / ours_seconds:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
