"""bench/scale.py in a small CPU run, in this process on a 2-layer cut of SmolLM2-135M's shape (the
shape's cost is its layers' count times one layer's; its two ica runs are still processes): the
shape's row holds every figure, and the bytes add up."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers.processes import ROOT, record_results

ROW = re.compile(
    r"(?P<shape>[\w.-]+): (?P<params>[\d.]+)B parameters, (?P<tokens>[\d,]+) tokens; bare forward [\d,]+ tok/s, "
    r"recording [\d,]+ tok/s \((?P<ratio>[\d.]+)\), (?P<gb>[\d.]+) GB written; "
    r"ica global (?P<global>[\d.]+) min / [\d.]+ GB, ica per-layer (?P<layer>[\d.]+) min / [\d.]+ GB, "
    r"ica no-cache (?P<live>[\d.]+) min / [\d.]+ GB; "
    r"masked LoRA step (?P<step>[\d.]+) s$"
)
TWO_LAYERS = "smollm2-135m-2-layers"


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale", ROOT / "bench" / "scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _billions_of_parameters(config) -> float:
    with torch.device("meta"):  # the shape's count, without making its weights
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) / 1e9


def test_the_shapes_table_holds_smollm2_135ms_parameter_count() -> None:
    assert abs(_billions_of_parameters(_scale_module().SHAPES["smollm2-135m"]) - 0.13) < 0.01  # tied embeddings


@pytest.mark.slow  # about 40 s: a 2-layer shape's stages, two ica processes
def test_cpu_run_prints_a_row_per_shape_and_the_ratio(monkeypatch, capsys) -> None:
    scale = _scale_module()
    shape = copy.deepcopy(scale.SHAPES["smollm2-135m"])
    shape.num_hidden_layers = 2
    monkeypatch.setitem(scale.SHAPES, TWO_LAYERS, shape)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the ica processes run this checkout's fn_analyze
    monkeypatch.chdir(ROOT)
    argv = ["scale.py", "--cpu", "--shapes", TWO_LAYERS, "--tokens", "400", "--repeats", "1", "--components", "5"]
    monkeypatch.setattr(sys, "argv", argv)
    rows = record_results(monkeypatch, scale, "measure")
    scale.main()
    assert len(rows) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    row = ROW.match(lines[-2])
    assert row, lines[-2]
    assert row["shape"] == TWO_LAYERS
    assert row["params"] == f"{_billions_of_parameters(shape):.2f}"
    tokens = int(row["tokens"].replace(",", ""))
    assert tokens == 400
    assert row["gb"] == f"{rows[0].gb_written:.2f}"  # the row prints 0.00 GB: the bytes are checked unrounded
    payload_gb = tokens * 2 * 1536 * 2 / 1e9  # float16 values of every layer's neurons
    assert payload_gb <= rows[0].gb_written < 1.5 * payload_gb
    assert all(float(row[name]) > 0 for name in ("global", "layer", "live", "step"))
    assert lines[-1] == f"scale: ratio={float(row['ratio']):.3f}"
