"""The real path on the embedded SmolLM2-135M-Instruct: a few hundred tokens, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fn_analyze.networks.ica import IcaConfig, run_ica
from fn_analyze.record.collect import CollectConfig, collect
from fn_train.config import TrainConfig
from fn_train.trainer import train
from shared.hooks import count_hooks
from shared.masked_model import MaskedModel
from shared.models import load_causal_lm, load_tokenizer
from tests.helpers.processes import subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded_acts(demo_dir: Path, tmp_path_factory) -> Path:
    """300 tokens of the demo data's activations, collected with the default (embedded) model."""
    out = tmp_path_factory.mktemp("embedded") / "acts"
    collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=out, max_tokens=300, device="cpu"))
    return out


def test_embedded_model_collect_ica_mask_train(demo_dir: Path, embedded_acts: Path, tmp_path: Path) -> None:
    manifest = json.loads((embedded_acts / "manifest.json").read_text())
    assert manifest["model"]["n_layers"] == 30 and manifest["model"]["intermediate_size"] == 1536
    assert manifest["n_tokens"] == 300
    mask = run_ica(
        IcaConfig(activations=embedded_acts, out=tmp_path / "smol.json", n_components=8, runs=2, register=False)
    )
    assert mask.networks and mask.model.name == "smollm2-135m"

    model = load_causal_lm("smollm2-135m", torch.float32, torch.device("cpu"))
    tokenizer = load_tokenizer("smollm2-135m")
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        base = model(**batch).logits
        with MaskedModel(model, mask, "key", networks=[0]):
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


SARCASM_ROWS = [
    ("Oh great, another Monday. Is this sarcastic?", "yes"),
    ("I love sunny days at the beach. Is this sarcastic?", "no"),
    ("Wow, I just love waiting in line for hours. Is this sarcastic?", "yes"),
    ("The train arrived on time today. Is this sarcastic?", "no"),
]


def test_the_seed_command_line_runs_unchanged(tmp_path: Path) -> None:
    """The user's reference fnsft command line, model and data paths aside, on a 4-row csv
    (3 training rows and 1 held out by --validation_split 0.05: 2 steps per epoch)."""
    import csv

    with (tmp_path / "sarcasm.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer"])
        writer.writerows(SARCASM_ROWS)
    seed_command = (
        "--model_name_or_path smollm2-135m --dataset_name_or_path sarcasm.csv "
        "--output_dir ./fine-tuned-model --template_format auto --num_train_epochs 2 "
        "--per_device_train_batch_size 2 --per_device_eval_batch_size 2 --learning_rate 1e-5 "
        "--torch_dtype float32 --validation_split 0.05 --max_seq_length 128 --eval_steps 40 "
        "--logging_steps 40 --save_steps 150 --max_grad_norm 2"
    )
    result = subprocess.run(
        [sys.executable, "-m", "fn_train.cli", *seed_command.split()],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "fine-tuned-model"
    assert (out / "adapter_model.safetensors").is_file()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["num_train_epochs"] == 2
    assert any("eval_loss" in entry for entry in state["log_history"])  # the held-out row was evaluated


def test_embedded_model_evaluate_mean_ablation_with_accuracy(
    demo_dir: Path, embedded_acts: Path, tmp_path: Path
) -> None:
    """`fn-analyze evaluate --ablation mean` on the demo's sentiment classification rows:
    accuracy is measured (the instruct model does better than chance at baseline) and the
    networks' neurons are set to their means, taken from activations of the same model."""
    from fn_analyze.measure.evaluate import EvaluateConfig, evaluate
    from fn_analyze.report.eval_table import format_table
    from shared.masks import MaskFile, Network, save_mask_file
    from shared.models import model_info

    model = load_causal_lm("smollm2-135m", torch.float32, torch.device("cpu"))
    network = Network(0, {layer: tuple(range(0, 1536, 16)) for layer in range(20, 30)})  # 960 neurons
    mask = MaskFile(model_info(model, "smollm2-135m"), (network,), {"method": "test"})
    save_mask_file(mask, tmp_path / "mask.json")
    results = evaluate(
        EvaluateConfig(
            mask_file=tmp_path / "mask.json",
            dataset=str(demo_dir / "sentiment.csv"),
            out=tmp_path / "r.json",
            activations=embedded_acts,
            ablation="mean",
            limit=12,
            draws=1,
            network_draws=0,
            random_fraction=0.15,
            device="cpu",
        )
    )
    assert results["dataset"]["choice_records"] == 12
    assert results["baseline"]["accuracy"] > 0.5
    assert results["ablation"]["mode"] == "mean" and "activations" in results["ablation"]["means_source"]
    key = results["conditions"][0]
    assert key["mode"] == "key" and "accuracy_ratio" in key["controls"]["layer_matched"]
    assert key["loss"] != results["baseline"]["loss"]
    assert "accuracy (as Liu et al.’s SST-2 table)" in format_table(results)
