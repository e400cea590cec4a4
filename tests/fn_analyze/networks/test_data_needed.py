"""The minimum-data rule of `fn-analyze ica` (fn_analyze/networks/data_needed.py): below the floor
(fewer tokens in a part than the reduction's k + oversample columns) it refuses and names the flag
that goes on; below 10 tokens or 10 neurons per component it warns."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fn_analyze.cli import app
from fn_analyze.networks.data_needed import meets_floor, refuse_below_floor, warn_little_data
from shared.errors import ParameterError
from tests.helpers.activations import write_activations
from tests.helpers.processes import refused

runner = CliRunner()


def _activations(folder: Path, tokens: int) -> Path:
    data = np.random.default_rng(0).laplace(size=(tokens, 3 * 40)).astype(np.float32)
    return write_activations(folder, data, [0, 1, 2], 40)


def test_the_floor_is_k_plus_oversample_tokens_in_each_part() -> None:
    assert meets_floor(n_rows=40, k=10, oversample=10, splits=2)  # 20 per part
    assert not meets_floor(n_rows=39, k=10, oversample=10, splits=2)  # 19 in a part
    assert meets_floor(n_rows=20, k=10, oversample=10, splits=0)  # the whole data only
    with pytest.raises(ParameterError, match=r"at least 20 tokens in each part .* the data hold 30 tokens, 15 in each"):
        refuse_below_floor(n_rows=30, k=10, oversample=10, splits=2)


def test_warnings_name_the_tokens_and_neurons_needed(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        warn_little_data(n_rows=1000, n_neurons=5000, k=20, splits=2)  # 500 per part: enough
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        warn_little_data(n_rows=130, n_neurons=150, k=20, splits=2)
    tokens, neurons = (record.getMessage() for record in caplog.records)
    assert "130 tokens, 65 in each of the 2 parts" in tokens and "at least 400 tokens (200 per part)" in tokens
    assert "fn-analyze compare" in tokens
    assert "over 150 neurons" in neurons and "at most 15" in neurons


def test_ica_below_the_floor_is_refused_and_goes_on_when_told(tmp_path: Path) -> None:
    acts = _activations(tmp_path / "acts", tokens=30)  # 15 tokens in each of the 2 parts
    out = tmp_path / "m.json"
    args = ["ica", "--activations", str(acts), "--out", str(out), "--n-components", "10", "--no-register"]
    result = runner.invoke(app, args)
    refused(result, "--n-components 10 needs at least 20 tokens in each part", "--allow-little-data")
    assert not out.exists()
    result = runner.invoke(app, [*args, "--allow-little-data", "--runs", "2"])
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_auto_tries_only_the_components_the_data_allow(tmp_path: Path, caplog) -> None:
    acts = _activations(tmp_path / "acts", tokens=40)  # 20 per part: k=5 (5 + 10) fits, k=10 (10 + 10) too
    out = tmp_path / "m.json"
    with caplog.at_level(logging.WARNING):
        result = runner.invoke(
            app, ["ica", "--activations", str(acts), "--out", str(out), "--n-components", "auto", "--runs", "2",
                  "--no-register"],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "10 components on 40 tokens" in caplog.text  # the largest k tried is 10, not 15 or more
