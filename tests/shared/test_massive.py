"""The neurons `ica` set aside as massive: a group selected by name (`--networks massive`), left out of
evaluate's random sets, and the note fn-train prints when a keep-only run uses a mask not made for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fn_train.run_mask import resolve_run_mask
from shared.errors import UserError
from shared.layer_masks import build_layer_masks
from shared.masks import (
    MASSIVE,
    MaskFile,
    made_for,
    parse_network_ids,
    save_mask_file,
    select_networks,
)
from tests.helpers.masks import make_mask
from tests.helpers.tiny_models import tiny_model

NETWORKS = {0: {0: [1, 2, 3]}, 1: {1: [4, 5]}}
SET_ASIDE = {"0": [7, 9], "1": [11]}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def with_ica(mask: MaskFile, **ica) -> MaskFile:
    """`mask` as `fn-analyze ica` would have recorded these preprocessing settings."""
    return MaskFile(mask.model, mask.networks, {"method": "spatial-ica", "ica": ica})


def default_mask(llama) -> MaskFile:
    return with_ica(make_mask(llama, NETWORKS), scale="none", set_aside={"size": 3, "layers": SET_ASIDE})


def test_the_massive_group_is_selected_by_name_and_switched_off(llama, tmp_path: Path) -> None:
    mask = default_mask(llama)
    assert parse_network_ids("0, Massive") == [0, MASSIVE]
    (massive,) = select_networks(mask, [MASSIVE])
    assert massive.layers == {0: (7, 9), 1: (11,)} and massive.size == 3
    assert [n.id for n in select_networks(mask, [1, MASSIVE])] == [1, MASSIVE]
    vectors = build_layer_masks(mask, [massive], "key").vectors
    assert {layer: (v == 0).nonzero().flatten().tolist() for layer, v in vectors.items()} == {0: [7, 9], 1: [11]}
    save_mask_file(mask, tmp_path / "m.json")  # fn-train resolves it from the file, as --networks massive does
    run_mask = resolve_run_mask(tmp_path / "m.json", "key", parse_network_ids("massive"))
    assert run_mask.layer_masks.masked_neurons == 3 and run_mask.record()["networks"] == [MASSIVE]


def test_a_file_without_set_aside_neurons_refuses_the_massive_group(llama) -> None:
    mask = with_ica(make_mask(llama, NETWORKS), scale="layer")
    assert mask.massive() is None
    with pytest.raises(UserError, match="--networks massive: the mask file sets no neuron aside"):
        select_networks(mask, [0, MASSIVE])
    with pytest.raises(UserError, match="'massiv' is not a number or range; write numbers such as 0,2-5,8 or massive"):
        parse_network_ids("0,massiv")


def test_set_aside_neurons_out_of_range_are_refused(llama) -> None:
    bad = with_ica(make_mask(llama, NETWORKS), set_aside={"size": 1, "layers": {"0": [10_000]}})
    with pytest.raises(UserError, match="set-aside neurons: network massive, layer 0: neuron index 10000 out of range"):
        bad.massive()


def test_the_keep_only_note_appears_only_for_complement_with_a_mask_not_made_for_it(llama, tmp_path: Path) -> None:
    masks = {
        "default": default_mask(llama),
        "layer": with_ica(make_mask(llama, NETWORKS), scale="layer"),
        "plain": with_ica(make_mask(llama, NETWORKS), scale="none"),
    }
    assert [made_for(m) for m in masks.values()] == ["key", "complement", None]
    notes = {}
    for name, mask in masks.items():
        save_mask_file(mask, tmp_path / f"{name}.json")
        for mode in ("key", "complement"):
            notes[name, mode] = resolve_run_mask(tmp_path / f"{name}.json", mode, None).recipe_note()
    assert {key for key, note in notes.items() if note} == {("default", "complement"), ("plain", "complement")}
    assert "was not made with `fn-analyze ica --scale layer`, the keep-only recipe" in notes["plain", "complement"]
    assert str(tmp_path / "plain.json") in notes["plain", "complement"]


def test_evaluate_random_sets_leave_out_the_set_aside_neurons(llama) -> None:
    import numpy as np

    from fn_analyze.neurons.neuron_sets import control_pool

    allowed = np.ones((2, 176), dtype=bool)
    set_aside = {(0, 7), (0, 9), (1, 11)}
    pool = control_pool(allowed, set_aside, {0: (1, 2, 3)})
    assert {(int(a), int(b)) for a, b in zip(*np.nonzero(~pool), strict=True)} == set_aside
    held = control_pool(allowed, set_aside, {0: (7, 9), 1: (11,)})  # the massive group's own controls
    assert held.all()
    assert control_pool(allowed, set(), {0: (1,)}) is allowed
    assert allowed.all()  # the caller's array is not changed


def test_training_controls_leave_out_the_set_aside_neurons(llama) -> None:
    """fn-train's random neurons (tune's --random-neurons, the experiment's controls) are drawn as evaluate's."""
    import numpy as np

    from fn_analyze.neurons.neuron_sets import draw_control, pairs

    mask = default_mask(llama)
    width = mask.model.intermediate_size
    neurons = {0: tuple(range(20, width)), 1: (4, 5)}  # layer 0: all but 20, so a free draw would take 7 and 9
    aside = {(0, 7), (0, 9), (1, 11)}
    for seed in range(10):
        drawn = draw_control(mask, neurons, "layer", None, 0.1, np.random.default_rng(seed))
        assert {layer: len(ns) for layer, ns in drawn.items()} == {0: width - 20, 1: 2}
        assert not pairs(drawn) & aside
    massive = draw_control(mask, mask.massive().layers, "layer", None, 0.1, np.random.default_rng(0))
    assert {layer: len(ns) for layer, ns in massive.items()} == {0: 2, 1: 1}  # its own neurons may be drawn
