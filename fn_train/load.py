"""One call to use what fn-train saved: the model (adapter on its base, or the full model)
with the run's mask re-applied for the block.

    with load_masked_model("runs/ft") as model:
        logits = model(**batch).logits

A run saved with --bake-mask needs no hook (its weights hold the mask); one saved without
it gets the mask hooks from its `fn_mask.json` (mode, networks, and ablation: zero, the
recorded means, or the scale factor), removed when the block ends.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from fn_train.run_mask import run_mask_from_record
from shared.arch import find_down_projections
from shared.constants import ADAPTER_CONFIG_NAME, RUN_MASK_NAME
from shared.hooks import masked_down_projections
from shared.masks import check_compatible
from shared.models import load_causal_lm, model_info


def load_trained(
    output_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
) -> nn.Module:
    """The trained model (an output folder or one of its checkpoints), in eval mode, without any hook."""
    output_dir = Path(output_dir)
    adapter_config = output_dir / ADAPTER_CONFIG_NAME
    if not adapter_config.is_file():
        return load_causal_lm(str(output_dir), dtype, torch.device(device), trust_remote_code=trust_remote_code)
    from peft import PeftModel

    base_name = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    base = load_causal_lm(base_name, dtype, torch.device(device), trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, output_dir).eval()


@contextlib.contextmanager
def load_masked_model(
    output_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
) -> Iterator[nn.Module]:
    """The trained model with its run's mask on for the block (no hook for a baked model)."""
    output_dir = Path(output_dir)
    model = load_trained(output_dir, dtype, device, trust_remote_code)
    record_path = output_dir / RUN_MASK_NAME
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else None
    if record is None or record.get("baked"):
        yield model
        return
    run_mask = run_mask_from_record(record, str(record_path))
    projections = find_down_projections(model)
    check_compatible(run_mask.mask, model_info(model, str(output_dir), projections), where=str(record_path))
    with masked_down_projections(projections, run_mask.layer_masks):
        yield model
