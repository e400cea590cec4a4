"""The per-neuron statistics pass: max |activation|, mean and mean square over real tokens equal the
same numbers computed by hand from activations captured with a plain hook (padding left out), from
a forward pass and from an activations folder; the folder's cache is read by every call, written
only when asked, one file per statistic named by the manifest's digest."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fn_analyze.neurons.magnitude import STATISTICS, TokenBatch, stats_from_activations, stats_from_forward
from fn_analyze.record.activations import open_activations
from shared.arch import find_down_projections
from shared.constants import MANIFEST_NAME
from shared.digests import file_digest
from shared.errors import UserError
from tests.helpers.activations import write_activations
from tests.helpers.tiny_models import tiny_model


def _batches() -> list[TokenBatch]:
    """Two batches, the second with a right-padded row (its padding ids are real-looking tokens)."""
    ids = torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    padded = torch.ones(2, 7, dtype=torch.long)
    padded[1, 4:] = 0
    return [TokenBatch(ids[:1], torch.ones(1, 7, dtype=torch.long)), TokenBatch(ids, padded)]


def _captured(model, batches: list[TokenBatch]) -> dict[int, np.ndarray]:
    """Every layer's down-projection inputs on the real tokens, float64, by a hook of the test's own."""
    rows: dict[int, list[np.ndarray]] = {}
    handles = []
    for p in find_down_projections(model):

        def keep(module, args, layer=p.layer) -> None:
            rows.setdefault(layer, []).append(args[0].detach().double().numpy())

        handles.append(p.module.register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            for batch in batches:
                model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    real = [batch.attention_mask.bool().numpy() for batch in batches]
    return {layer: np.concatenate([x[m] for x, m in zip(got, real, strict=True)]) for layer, got in rows.items()}


def test_forward_statistics_equal_hand_computations_on_real_tokens() -> None:
    model = tiny_model("llama")
    batches = _batches()
    captured = _captured(model, batches)
    stats = stats_from_forward(model.model, find_down_projections(model), batches, "a pass", STATISTICS)
    assert stats.n_tokens == 7 + 7 + 4 and stats.source == "a pass (18 tokens)"
    for layer, acts in captured.items():
        assert acts.shape[0] == 18
        np.testing.assert_allclose(stats.max_abs[layer], np.abs(acts).max(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats.mean[layer], acts.mean(axis=0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats.mean_square[layer], (acts**2).mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.variance, np.maximum(stats.mean_square - stats.mean**2, 0))
    assert stats.magnitude().max_abs is stats.max_abs and stats.means().values.dtype == np.float32


def test_forward_statistics_see_only_real_tokens_and_only_what_is_asked() -> None:
    model = tiny_model("llama")
    projections = find_down_projections(model)
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 6, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)], dim=1)
    alone = stats_from_forward(model.model, projections, [TokenBatch(ids, torch.ones_like(ids))], "a", STATISTICS)
    with_padding = stats_from_forward(model.model, projections, [TokenBatch(padded, mask)], "b", STATISTICS)
    assert alone.n_tokens == with_padding.n_tokens == 12
    for name in STATISTICS:
        np.testing.assert_allclose(getattr(with_padding, name), getattr(alone, name), rtol=1e-5, atol=1e-9)
    only = stats_from_forward(model.model, projections, [TokenBatch(ids, torch.ones_like(ids))], "c", ["max_abs"])
    assert only.mean is None and only.mean_square is None
    np.testing.assert_array_equal(only.max_abs, alone.max_abs)
    with pytest.raises(ValueError, match="mean was not measured"):
        only.means()
    nothing = TokenBatch(ids, torch.zeros_like(ids))
    with pytest.raises(UserError, match="d holds no token to measure the neurons on"):
        stats_from_forward(model.model, projections, [nothing], "d", ["mean"])


def test_folder_statistics_equal_hand_computations_and_are_cached_when_asked(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FN_CACHE_DIR", str(cache))
    rng = np.random.default_rng(0)
    matrix = rng.normal(1.0, 2.0, size=(300, 2 * 6)).astype(np.float16)
    folder = write_activations(tmp_path / "acts", matrix, [2, 0], 6, rows_per_shard=100)  # layers out of order
    info = open_activations(folder).model
    wide = matrix.astype(np.float64)
    by_layer = {2: wide[:, :6], 0: wide[:, 6:]}

    stats = stats_from_activations(folder, info, STATISTICS)
    assert not cache.exists()  # measured, written nowhere unless asked
    assert stats.n_tokens == 300 and stats.max_abs.shape == (3, 6)
    assert np.isnan(stats.max_abs[1]).all() and np.isnan(stats.mean[1]).all()  # a layer not recorded
    for layer, acts in by_layer.items():
        np.testing.assert_allclose(stats.max_abs[layer], np.abs(acts).max(axis=0))
        np.testing.assert_allclose(stats.mean[layer], acts.mean(axis=0))
        np.testing.assert_allclose(stats.mean_square[layer], (acts**2).mean(axis=0))

    stats_from_activations(folder, info, ["mean"], cache=True)
    (stored,) = (cache / "neuron-stats").iterdir()  # one file per statistic, named by what was measured
    digest = file_digest(folder / MANIFEST_NAME).split(":", 1)[1]
    assert stored.name == f"{digest}-mean.npy"
    np.save(stored, np.ones((3, 6)))  # every later call reads it, with or without `cache`
    assert np.array_equal(stats_from_activations(folder, info, ["mean"]).mean, np.ones((3, 6)))
    both = stats_from_activations(folder, info, ["mean", "mean_square"], cache=True)  # the missing one measured
    assert np.array_equal(both.mean, np.ones((3, 6)))
    np.testing.assert_array_equal(both.mean_square, stats.mean_square)
    assert sorted(p.name for p in (cache / "neuron-stats").iterdir()) == [
        f"{digest}-mean.npy",
        f"{digest}-mean_square.npy",
    ]


def test_folder_of_another_model_is_refused(tmp_path: Path) -> None:
    folder = write_activations(tmp_path / "acts", np.ones((10, 4), dtype=np.float16), [0], 4)
    other = replace(open_activations(folder).model, name="other", fingerprint="sha256:other")
    with pytest.raises(UserError, match="were recorded on 'synthetic'.*not on 'other'.*give activations of 'other'"):
        stats_from_activations(folder, other, ["max_abs"])
