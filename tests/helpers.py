"""Small builders the tests share."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from shared.masks import MaskFile, Network, save_mask_file
from shared.models import model_info


def make_mask(model: nn.Module, networks: dict[int, dict[int, list[int]]], name: str = "tiny") -> MaskFile:
    """A mask file for `model` with the given {network id: {layer: [neurons]}}."""
    return MaskFile(
        model=model_info(model, name),
        networks=tuple(
            Network(i, {layer: tuple(sorted(neurons)) for layer, neurons in layers.items()})
            for i, layers in networks.items()
        ),
        source={"method": "test"},
    )


def write_mask(model: nn.Module, networks: dict[int, dict[int, list[int]]], path: Path) -> Path:
    save_mask_file(make_mask(model, networks), path)
    return path


def write_activations(
    folder: Path,
    matrix,
    layers: list[int],
    intermediate_size: int,
    rows_per_shard: int = 1000,
    positions=None,
    token_ids=None,
) -> Path:
    """An activations folder (shards + manifest) holding `matrix` (tokens x neurons), as collect writes it;
    each row's position and token id are 0 unless given."""
    from fn_analyze.activations import write_matrix
    from shared.masks import ModelInfo

    info = ModelInfo("synthetic", "llama", max(layers) + 1, intermediate_size, 8, "sha256:synthetic")
    return write_matrix(folder, matrix, info, layers, rows_per_shard, positions, token_ids)


def record_results(monkeypatch, module, name: str) -> list:
    """Wrap `module.name` so that every value it returns is also appended to the returned list."""
    results: list = []
    original = getattr(module, name)

    def recording(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, name, recording)
    return results


def refused(result, *fragments: str) -> str:
    """The one output line of a CLI run refused with exit code 2, with no traceback; the line
    must hold every fragment. Printed, so `pytest -s` lists every message users can get."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    print(f"REFUSED {lines[0]}")
    return lines[0]
