"""Loading a model from a notebook: a name is enough, device and dtype default to auto."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.device import choose_device, choose_dtype
from shared.errors import UserError
from shared.models import load_causal_lm


def test_a_name_alone_loads_the_model_as_the_clis_auto_defaults_do(tiny_lm_dir: Path) -> None:
    model = load_causal_lm(str(tiny_lm_dir))
    device = choose_device("auto")
    weight = next(model.parameters())
    assert weight.device.type == device.type
    assert weight.dtype == choose_dtype("auto", device.type)
    assert not model.training


def test_device_and_dtype_are_read_as_the_clis_spell_them(tiny_lm_dir: Path) -> None:
    weight = next(load_causal_lm(str(tiny_lm_dir), "bfloat16", "cpu").parameters())
    assert (weight.dtype, weight.device) == (torch.bfloat16, torch.device("cpu"))
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        load_causal_lm(str(tiny_lm_dir), "float8", "cpu")
