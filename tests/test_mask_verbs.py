"""MaskFile's verbs (load, save, select, union, iou, compare, plot, apply) and MaskedModel."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from shared.errors import ParameterError, UserError
from shared.hooks import MaskedModel, apply_mask, count_hooks
from shared.masks import MaskFile, load_mask_file
from tests.helpers import assert_png, forward_logits, make_mask, random_ids, tiny_model

NETWORKS = {0: {0: [1, 2, 3], 1: [4]}, 1: {1: [4, 5, 6]}, 2: {0: [7]}}


@pytest.fixture
def model():
    return tiny_model("llama")


def test_save_load_select_and_union(model, tmp_path: Path) -> None:
    mask = make_mask(model, NETWORKS)
    assert mask.save(tmp_path / "m.json") == tmp_path / "m.json"
    assert MaskFile.load(tmp_path / "m.json") == mask == load_mask_file(tmp_path / "m.json")
    chosen = mask.select([1, 0])
    assert chosen.network_ids() == [1, 0] and chosen.model == mask.model
    assert mask.select(None) == mask
    assert mask.union() == {0: (1, 2, 3, 7), 1: (4, 5, 6)}
    assert mask.union([0, 1]) == {0: (1, 2, 3), 1: (4, 5, 6)}  # neuron 4 of layer 1 counted once
    with pytest.raises(UserError, match="network id 9 is not in the mask file"):
        mask.select([9])


def test_iou_and_compare_match_networks_one_to_one(model) -> None:
    mask = make_mask(model, NETWORKS)
    other = make_mask(model, {5: {1: [4, 5, 6]}, 6: {0: [1, 2, 3]}})
    iou = mask.iou(other)
    assert iou.shape == (3, 2)
    np.testing.assert_allclose(iou[:, 0], [1 / 6, 1.0, 0.0])
    np.testing.assert_allclose(iou[:, 1], [3 / 4, 0.0, 0.0])
    assert mask.compare(other) == [(1, 5, 1.0), (0, 6, 0.75)]
    stranger = make_mask(tiny_model("llama", intermediate_size=96), {0: {0: [1]}})
    with pytest.raises(ParameterError, match="other was made for model .* compare mask files of one model"):
        mask.iou(stranger)


def test_plot_writes_only_when_given_a_path(model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    mask = make_mask(model, NETWORKS)
    assert isinstance(mask.plot(), Figure)
    assert os.listdir(tmp_path) == []
    mask.plot(tmp_path / "networks.png")
    assert_png(tmp_path / "networks.png")


def test_apply_keeps_the_mask_on_until_it_is_lifted(model) -> None:
    mask = make_mask(model, NETWORKS)
    ids = random_ids(model)
    plain = forward_logits(model, ids)
    with apply_mask(model, mask, "key", [0, 1]):
        expected = forward_logits(model, ids)
    masked = mask.apply(model, mode="key", networks=[0, 1])
    assert isinstance(masked, MaskedModel) and masked.masked and masked.model is model
    assert count_hooks(model) == 2  # one per layer the networks touch
    assert torch.equal(forward_logits(masked, ids), expected)
    assert torch.equal(forward_logits(model, ids), expected)  # the hooks are on the model itself
    assert masked.config is model.config  # attributes are the model's
    assert masked.remove_mask() is model
    assert count_hooks(model) == 0 and not masked.masked
    masked.remove_mask()  # twice: nothing more to lift
    assert torch.equal(forward_logits(model, ids), plain)
    with mask.apply(model, mode="complement", networks=[2]) as kept:
        assert count_hooks(model) == 2  # complement: every layer has a vector
        assert not torch.equal(forward_logits(kept, ids), plain)
    assert count_hooks(model) == 0


def test_apply_refuses_a_model_the_file_was_not_made_for_and_leaves_no_hook(model) -> None:
    mask = make_mask(model, NETWORKS)
    other = tiny_model("llama", intermediate_size=96)
    with pytest.raises(UserError, match="was made for model"):
        mask.apply(other)
    assert count_hooks(other) == 0
