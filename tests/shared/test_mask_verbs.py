"""MaskFile's verbs (load, save, select, union, iou, compare), its figure, and that the type imports no torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from shared.errors import ParameterError, UserError
from shared.figures import networks_figure, save_png
from shared.masks import MaskFile, load_mask_file
from tests.helpers.masks import make_mask
from tests.helpers.reports import assert_png
from tests.helpers.tiny_models import tiny_model

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


def test_networks_figure_writes_only_when_saved(model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    mask = make_mask(model, NETWORKS)
    fig = networks_figure(mask)
    assert isinstance(fig, Figure)
    assert os.listdir(tmp_path) == []
    save_png(fig, tmp_path / "networks.png")
    assert_png(tmp_path / "networks.png")


def test_the_mask_file_type_imports_no_torch(model, tmp_path: Path) -> None:
    """A mask file is data: loading one, selecting and comparing its networks needs no torch (run in a
    clean interpreter, where nothing else has imported it)."""
    make_mask(model, NETWORKS).save(tmp_path / "m.json")
    script = textwrap.dedent(
        f"""
        import sys
        from shared.masks import MaskFile
        mask = MaskFile.load({str(tmp_path / "m.json")!r})
        assert mask.select([0, 1]).union() == {{0: (1, 2, 3), 1: (4, 5, 6)}}
        assert mask.compare(mask)[0][2] == 1.0
        assert "torch" not in sys.modules, "shared.masks imported torch"
        """
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
