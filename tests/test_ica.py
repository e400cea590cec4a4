"""ICA: planted networks are found; bad component counts are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fn_analyze.ica import IcaConfig, run_ica
from shared.errors import UserError
from shared.masks import load_mask_file
from tests.helpers import write_activations

LAYERS = [0, 1, 2]
WIDTH = 200  # neurons per layer


def _planted(seed: int = 0, tokens: int = 4000, n_networks: int = 5, size: int = 24):
    """Activations where each planted network's neurons share one sparse time course, plus noise.

    Networks span layers (their neurons are drawn from all of them), as real ones do.
    """
    rng = np.random.default_rng(seed)
    n_neurons = len(LAYERS) * WIDTH
    order = rng.permutation(n_neurons)
    networks = [set(order[i * size : (i + 1) * size].tolist()) for i in range(n_networks)]
    data = rng.normal(0.0, 1.0, (tokens, n_neurons)) + rng.normal(0.0, 2.0, n_neurons)  # noise, per-neuron offsets
    for members in networks:
        course = rng.laplace(0.0, 1.0, tokens) * (rng.random(tokens) < 0.3)  # sparse, heavy-tailed
        weights = rng.uniform(1.0, 2.0, len(members))
        data[:, sorted(members)] += 3.0 * course[:, None] * weights
    return data.astype(np.float32), networks


def _found_sets(mask) -> list[set[int]]:
    return [
        {LAYERS.index(layer) * WIDTH + n for layer, neurons in network.layers.items() for n in neurons}
        for network in mask.networks
    ]


def _iou(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b)


def test_planted_networks_are_recovered(tmp_path: Path) -> None:
    data, planted = _planted()
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=1500)  # 3 shards
    mask = run_ica(IcaConfig(activations=folder, out=tmp_path / "m.json", n_components=8, restarts=3, register=False))
    found = _found_sets(mask)
    for members in planted:
        best = max(_iou(members, other) for other in found)
        assert best >= 0.8, f"planted network matched with IoU {best:.2f}"
    assert load_mask_file(tmp_path / "m.json") == mask
    stable = [network.stats["stability"] for network in mask.networks]
    assert all(0.0 <= s <= 1.0 for s in stable)


def test_percentile_threshold_keeps_the_top_share(tmp_path: Path) -> None:
    data, _ = _planted(tokens=1500)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH)
    mask = run_ica(
        IcaConfig(
            activations=folder, out=tmp_path / "p.json", n_components=5, percentile=99.0, restarts=1, register=False
        )
    )
    assert len(mask.networks) == 5
    assert all(network.size == 6 for network in mask.networks)  # 1% of 600 neurons


def test_too_many_components_is_refused_with_the_limit(tmp_path: Path) -> None:
    data, _ = _planted(tokens=30)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH)
    with pytest.raises(UserError, match="--n-components 40 is larger than the data allows: .* at most 29"):
        run_ica(IcaConfig(activations=folder, out=tmp_path / "m.json", n_components=40))
    assert not (tmp_path / "m.json").exists()


def test_standardize_option_is_recorded(tmp_path: Path) -> None:
    data, _ = _planted(tokens=800)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH)
    mask = run_ica(
        IcaConfig(
            activations=folder, out=tmp_path / "s.json", n_components=4, standardize=True, restarts=1, register=False
        )
    )
    assert mask.source["ica"]["standardize"] is True
    assert mask.source["activations"]["n_tokens"] == 800


def test_missing_or_unfinished_activations_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        run_ica(IcaConfig(activations=tmp_path / "none", out=tmp_path / "m.json"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "shard-r00-00000.h5.partial").write_bytes(b"")
    with pytest.raises(UserError, match="unfinished shard"):
        run_ica(IcaConfig(activations=tmp_path / "half", out=tmp_path / "m.json"))
