"""A mask file of the original model, given for a pruned one, is refused with the pruned folder's own
mask file named (where `fn-analyze prune` wrote the mask remapped to the kept neurons), not with
advice to run `fn-analyze ica`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.constants import MODEL_CONFIG_NAME, PRUNE_MASK_NAME, PRUNE_RECORD_NAME
from shared.errors import UserError
from shared.masks import MaskFile, ModelInfo, Network, check_compatible


def _info(name: str, intermediate_size: int) -> ModelInfo:
    return ModelInfo(name, "llama", 2, intermediate_size, 64, f"sha256:{intermediate_size}")


def _mask() -> MaskFile:
    return MaskFile(model=_info("base", 176), networks=(Network(0, {0: (1, 2)}),))


def test_a_pruned_folder_points_to_its_own_mask_file(tmp_path: Path) -> None:
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    for name in (MODEL_CONFIG_NAME, PRUNE_RECORD_NAME, PRUNE_MASK_NAME):
        (pruned / name).write_text(json.dumps({}))
    with pytest.raises(UserError) as refused:
        check_compatible(_mask(), _info(str(pruned), 88))
    assert str(refused.value).endswith(f"use the pruned folder's own mask file, {pruned / PRUNE_MASK_NAME}")
    assert "fn-analyze ica" not in str(refused.value)


def test_any_other_model_is_told_to_make_a_mask_for_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"use a mask file made for this model \(`fn-analyze ica`\)$"):
        check_compatible(_mask(), _info(str(tmp_path / "other-model"), 88))
