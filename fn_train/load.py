"""One call to use what fn-train saved: the model (adapter on its base, or the full model)
with the run's mask installed, as a `MaskedModel` (shared.masked_model) that lifts it on request.

    model = load_masked_model("runs/ft")      # the mask stays on until model.remove_mask()
    with load_masked_model("runs/ft") as model:  # or until the block ends
        logits = model(**batch).logits
    plain = load_masked_model("runs/ft").merge_and_unload()  # or written into the weights

A run saved with --bake-mask needs no hook (its weights hold the mask); one saved without
it gets the mask hooks from its `fn_mask.json` (mode, networks, and ablation: zero, the
recorded means, or the scale factor). A tune run's deltas are loaded onto its base and added
by their hooks, as in training (merged into the weights with --merge_adapter, they need none).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fn_train.run_mask import run_mask_from_record
from shared.arch import find_down_projections
from shared.constants import RUN_MASK_NAME, TUNED_DELTAS_NAME
from shared.masked_model import MaskedModel
from shared.masks import check_compatible
from shared.models import model_info
from shared.trained import load_trained, run_record, tuned_base_and_deltas


def load_masked_model(
    output_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
) -> MaskedModel:
    """The trained model with its run's mask installed (no hook for a baked model) until
    `remove_mask()` or the end of a `with` block."""
    output_dir = Path(output_dir)
    record = run_record(output_dir)
    record_path = str(output_dir / RUN_MASK_NAME)
    if (output_dir / TUNED_DELTAS_NAME).is_file():
        model, deltas = tuned_base_and_deltas(output_dir, dtype, device, trust_remote_code)
        assert record is not None  # tuned_base_and_deltas refuses a folder without one
        check_compatible(
            run_mask_from_record(record, record_path).mask, model_info(model, str(output_dir)), record_path
        )
        return MaskedModel.from_deltas(model, deltas)
    model = load_trained(output_dir, dtype, device, trust_remote_code)
    if record is None or record.get("baked"):
        return MaskedModel.from_layer_masks(model, None)
    run_mask = run_mask_from_record(record, record_path)
    projections = find_down_projections(model)
    check_compatible(run_mask.mask, model_info(model, str(output_dir), projections), where=record_path)
    return MaskedModel.from_layer_masks(model, run_mask.layer_masks)
