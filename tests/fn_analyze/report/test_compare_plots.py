"""fn-analyze compare (IoU of networks) and the PNG figures of compare and show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fn_analyze.cli import app
from fn_analyze.report.compare import CompareConfig, compare, format_comparison, iou_matrix
from shared.errors import UserError
from shared.masks import load_mask_file
from tests.helpers.masks import write_mask
from tests.helpers.reports import assert_png
from tests.helpers.tiny_models import tiny_model

runner = CliRunner()
DISJOINT = {0: {0: [1, 2, 3], 1: [7]}, 1: {1: [8, 9]}, 2: {0: [50]}}


@pytest.fixture
def model():
    return tiny_model("llama")


def test_iou_of_a_file_with_itself_is_the_identity(model, tmp_path: Path) -> None:
    path = write_mask(model, DISJOINT, tmp_path / "a.json")
    result = compare(CompareConfig(path, path, tmp_path / "out" / "self.json"))
    np.testing.assert_array_equal(np.array(result["iou"]), np.eye(3))
    assert [m["match"] for m in result["best_match_a_in_b"]] == [0, 1, 2]
    assert result["mean_best_iou_a"] == result["mean_matched_iou"] == 1.0
    assert json.loads((tmp_path / "out" / "self.json").read_text()) == result
    assert_png(tmp_path / "out" / "self.png")


def test_iou_values_best_matches_and_one_to_one_matching(model, tmp_path: Path) -> None:
    a = write_mask(model, {0: {0: [1, 2, 3, 4]}, 1: {1: [10, 11]}}, tmp_path / "a.json")
    # B0 shares 2 of A0's 4 neurons and has 1 of its own: IoU 2/5. B1 holds A0's neurons 3, 4 and A1's 10:
    # IoU 2/5 with A0, 1/4 with A1. B2 is A1.
    b = write_mask(model, {0: {0: [1, 2, 9]}, 1: {0: [3, 4], 1: [10]}, 2: {1: [10, 11]}}, tmp_path / "b.json")
    matrix = iou_matrix(load_mask_file(a), load_mask_file(b))
    np.testing.assert_allclose(matrix, [[2 / 5, 2 / 5, 0.0], [0.0, 1 / 4, 1.0]])
    result = compare(CompareConfig(a, b, tmp_path / "ab.json"))
    first, second = result["matching"]
    assert first["a"] == 0 and first["iou"] == pytest.approx(0.4) and (second["a"], second["b"]) == (1, 2)
    assert result["best_match_b_in_a"][2] == {"network": 2, "match": 1, "iou": 1.0}
    table = format_comparison(result)
    assert "one-to-one matching" in table and "1.000" in table
    # One line for reproducibility: of the 3 networks of the larger file, one (A1-B2, IoU 1) is matched
    # at IoU >= 0.8 and at >= 0.5; the pair A0-B0 (0.4) is at neither, and B1 has no partner.
    assert result["reproduced"]["0.8"] == {"matched": 1, "of": 3, "share": 1 / 3}
    assert result["reproduced"]["0.5"] == {"matched": 1, "of": 3, "share": 1 / 3}
    assert (
        "reproducibility: 1/3 (33%) matched one to one at IoU >= 0.8, 1/3 (33%) matched one to one at IoU >= 0.5"
        in table.splitlines()
    )


def test_masks_of_different_models_are_refused(model, tmp_path: Path) -> None:
    a = write_mask(model, DISJOINT, tmp_path / "a.json")
    b = write_mask(tiny_model("qwen2"), {0: {0: [1]}}, tmp_path / "b.json")
    with pytest.raises(UserError, match="made for different models"):
        compare(CompareConfig(a, b, tmp_path / "ab.json"))
    assert not (tmp_path / "ab.json").exists()


def test_compare_and_show_plot_commands_write_pngs(model, tmp_path: Path) -> None:
    a = write_mask(model, DISJOINT, tmp_path / "a.json")
    out = runner.invoke(app, ["compare", str(a), str(a), "--out", str(tmp_path / "cmp.json")])
    assert out.exit_code == 0, out.output
    assert "mean best IoU" in out.output
    assert_png(tmp_path / "cmp.png")
    shown = runner.invoke(app, ["show", str(a), "--plot", str(tmp_path / "nets.png")])
    assert shown.exit_code == 0, shown.output
    assert "union:" in shown.output
    assert_png(tmp_path / "nets.png")
    bad = runner.invoke(app, ["compare", str(a), str(tmp_path / "missing.json")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


KEEPS_BACKEND = """
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("svg")  # the caller's own backend, e.g. a notebook's inline one
import fn_analyze.report.compare, fn_analyze.measure.evaluate, fn_analyze.report.show  # noqa: E401
from fn_analyze.report.plots import plot_iou, plot_networks
from shared.masks import MaskFile, ModelInfo, Network

mask = MaskFile(ModelInfo("tiny", "llama", 2, 8, 4, "sha256:tiny"), (Network(0, {0: (1, 2), 1: (3,)}),))
plot_networks(mask, Path(sys.argv[1]) / "networks.png")
plot_iou(np.eye(2), [0, 1], [0, 1], "a", "b", Path(sys.argv[1]) / "iou.png")
print(matplotlib.get_backend())
"""


def test_drawing_a_figure_leaves_the_callers_matplotlib_backend_alone(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KEEPS_BACKEND, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"
    assert_png(tmp_path / "networks.png")
    assert_png(tmp_path / "iou.png")
