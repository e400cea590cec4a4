"""The mask artifact: round trip, validation, selection, per-layer vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.errors import UserError
from shared.layer_masks import build_layer_masks
from shared.mask_index import read_index, register_mask
from shared.masks import (
    check_compatible,
    load_mask_file,
    parse_network_ids,
    save_mask_file,
    select_networks,
)
from shared.models import model_info
from tests.helpers.masks import make_mask
from tests.helpers.tiny_models import tiny_model

NETWORKS = {0: {0: [3, 1, 2], 1: [5]}, 1: {1: [7, 8]}, 2: {0: [100]}}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_round_trip_keeps_everything(llama, tmp_path: Path) -> None:
    mask = make_mask(llama, NETWORKS)
    save_mask_file(mask, tmp_path / "m.json")
    loaded = load_mask_file(tmp_path / "m.json")
    assert loaded == mask
    assert loaded.networks[0].layers == {0: (1, 2, 3), 1: (5,)}
    assert json.loads((tmp_path / "m.json").read_text())["networks"][0]["size"] == 4
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file of the atomic write is gone


def _write_raw(tmp_path: Path, llama, edit) -> Path:
    raw = make_mask(llama, NETWORKS).to_dict()
    edit(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(schema_version=99), "unknown schema_version 99"),
        (lambda r: r["networks"][0]["layers"].update({"0": [1, 1]}), "neuron index 1 listed twice"),
        (lambda r: r["networks"][0]["layers"].update({"0": [176]}), "neuron index 176 out of range"),
        (lambda r: r["networks"][0]["layers"].update({"5": [1]}), "layer 5 out of range"),
        (lambda r: r["networks"][1].update(id=0), "network id 0 appears twice"),
        (lambda r: r["networks"][0].update(size=3), "'size' is 3"),
        (lambda r: r.pop("model"), "'model' must hold"),
    ],
)
def test_invalid_files_are_refused_with_one_line(llama, tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        load_mask_file(_write_raw(tmp_path, llama, edit))
    assert "\n" not in str(info.value)


def test_truncated_and_missing_files(llama, tmp_path: Path) -> None:
    save_mask_file(make_mask(llama, NETWORKS), tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match="not valid JSON"):
        load_mask_file(tmp_path / "cut.json")
    with pytest.raises(UserError, match="does not exist"):
        load_mask_file(tmp_path / "nothing.json")


def test_mask_for_another_model_is_refused(llama) -> None:
    mask = make_mask(llama, NETWORKS)
    other = tiny_model("llama", intermediate_size=192)
    with pytest.raises(UserError, match="intermediate_size=176"):
        check_compatible(mask, model_info(other, "other"))
    deeper = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(UserError, match="n_layers=2"):
        check_compatible(mask, model_info(deeper, "deeper"))
    check_compatible(mask, model_info(tiny_model("llama"), "same architecture"))


def test_selection(llama) -> None:
    mask = make_mask(llama, NETWORKS)
    assert parse_network_ids("0, 2-3") == [0, 2, 3]
    assert parse_network_ids(None) is None and parse_network_ids("all") is None
    assert [n.id for n in select_networks(mask, [2, 0, 2])] == [2, 0]
    with pytest.raises(UserError, match="network id 9 is not in the mask file"):
        select_networks(mask, [9])
    with pytest.raises(UserError, match="not a number or range"):
        parse_network_ids("zero")


def test_key_and_complement_vectors(llama) -> None:
    mask = make_mask(llama, NETWORKS)
    key = build_layer_masks(mask, select_networks(mask, [0, 1]), "key")
    assert set(key.vectors) == {0, 1}
    assert torch.equal(torch.nonzero(key.vectors[0] == 0).flatten(), torch.tensor([1, 2, 3]))
    assert torch.equal(torch.nonzero(key.vectors[1] == 0).flatten(), torch.tensor([5, 7, 8]))
    assert key.masked_neurons == 6 and key.fully_closed_layers == ()

    complement = build_layer_masks(mask, select_networks(mask, [1]), "complement")
    assert complement.fully_closed_layers == (0,)  # network 1 has no neuron in layer 0
    assert not complement.vectors[0].any()
    assert torch.equal(torch.nonzero(complement.vectors[1]).flatten(), torch.tensor([7, 8]))
    assert complement.masked_neurons == 176 + 174


def test_index_registers_files(llama, tmp_path: Path) -> None:
    mask = make_mask(llama, NETWORKS)
    for name in ("a.json", "b.json", "a.json"):
        save_mask_file(mask, tmp_path / name)
        register_mask(tmp_path / name, mask)
    entries = read_index(tmp_path)["masks"]
    assert sorted(e["file"] for e in entries) == ["a.json", "b.json"]
    assert entries[0]["fingerprint"] == mask.model.fingerprint


def test_schema_1_files_are_migrated_on_read(llama, tmp_path: Path) -> None:
    """A file written by the one-run ICA of schema 1 loads as schema 2, its figures kept; saved again, it is 2."""
    raw = make_mask(llama, NETWORKS).to_dict()
    raw["schema_version"] = 1
    raw["source"] = {"method": "spatial-ica", "ica": {"n_components": 3, "restarts": 5, "threshold": 3.0}}
    raw["networks"][0].update(stability=0.97, reappearance=1.0)
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(raw))
    mask = load_mask_file(path)
    assert mask.schema_version == 2 and mask.source["migrated_from_schema"] == 1
    assert mask.networks[0].stats == {"stability": 0.97, "reappearance": 1.0}
    assert [n.layers for n in mask.networks] == [n.layers for n in make_mask(llama, NETWORKS).networks]
    save_mask_file(mask, tmp_path / "v2.json")
    assert json.loads((tmp_path / "v2.json").read_text())["schema_version"] == 2
    assert load_mask_file(tmp_path / "v2.json") == mask

    from fn_analyze.report.show import describe

    shown = describe(mask)
    assert "one ICA run (schema 1" in shown and "stab. reap." in shown
    assert "0.97  1.00  |" in shown.splitlines()[6]
