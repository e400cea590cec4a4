"""The real path on the embedded SmolLM2-135M-Instruct: a few hundred tokens, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fn_analyze.collect import CollectConfig, collect
from fn_analyze.ica import IcaConfig, run_ica
from fn_train.config import TrainConfig
from fn_train.trainer import train
from shared.hooks import apply_mask, count_hooks
from shared.models import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.slow


def test_embedded_model_collect_ica_mask_train(demo_dir: Path, tmp_path: Path) -> None:
    manifest = collect(
        CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=tmp_path / "acts", max_tokens=300, device="cpu")
    )
    assert manifest["model"]["n_layers"] == 30 and manifest["model"]["intermediate_size"] == 1536
    assert manifest["n_tokens"] == 300
    mask = run_ica(
        IcaConfig(activations=tmp_path / "acts", out=tmp_path / "smol.json", n_components=8, restarts=2, register=False)
    )
    assert mask.networks and mask.model.name == "smollm2-135m"

    model = load_causal_lm("smollm2-135m", torch.float32, torch.device("cpu"))
    tokenizer = load_tokenizer("smollm2-135m")
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        base = model(**batch).logits
        with apply_mask(model, mask, "key", networks=[0]):
            ablated = model(**batch).logits
            assert count_hooks(model) == len(mask.networks[0].layers)  # one hook per layer it touches
        restored = model(**batch).logits
    assert count_hooks(model) == 0
    assert not torch.equal(base, ablated)
    assert torch.equal(base, restored)  # hooks gone: the model is back

    train(
        TrainConfig(
            dataset_name_or_path=str(demo_dir / "train.csv"),
            output_dir=tmp_path / "ft",
            mask_file=tmp_path / "smol.json",
            networks="0",
            max_steps=2,
            per_device_train_batch_size=2,
            max_seq_length=64,
            device="cpu",
        )
    )
    assert json.loads((tmp_path / "ft" / "fn_mask.json").read_text())["mask"]["model"]["name"] == "smollm2-135m"
