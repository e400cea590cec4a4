"""Tracking for real: a tiny masked run with --report_to tensorboard and with wandb (offline)
writes the tracker's own files, and the mask (file, mode, networks, digest) is in the run's config."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from fn_train.trainer import train
from tests.helpers.masks import MASKED, write_mask
from tests.helpers.training import small_run


def _masked_run(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, report_to: str) -> tuple[Path, dict]:
    mask = write_mask(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), MASKED, tmp_path / "mask.json")
    out = tmp_path / "out"
    train(small_run(tiny_lm_dir, demo_dir, out, mask, max_steps=2, networks="0", report_to=report_to))
    return out, json.loads((out / "fn_mask.json").read_text())


def test_tensorboard_writes_event_files_with_the_loss_and_the_mask(tiny_lm_dir, demo_dir, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, record = _masked_run(tiny_lm_dir, demo_dir, tmp_path, "tensorboard")
    events = list(out.glob("runs/*/events.out.tfevents.*"))
    assert events, sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2]
    args = json.loads(accumulator.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode())
    assert args["fn_mask_file"] == str(tmp_path / "mask.json") and args["fn_mask_mode"] == "key"
    assert args["fn_networks"] == "0" and args["fn_ablation"] == "zero"
    assert args["fn_mask_digest"] == record["digest"]


def test_wandb_offline_writes_its_run_folder_with_the_mask_config(tiny_lm_dir, demo_dir, tmp_path, monkeypatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        _, record = _masked_run(tiny_lm_dir, demo_dir, tmp_path, "wandb")
    finally:
        wandb.finish()
        wandb.teardown()  # ends wandb's writer process, so its run file is complete before it is read
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((tmp_path / "wandb").rglob("*"))
    # The offline run file holds the config records (key, JSON value) that `wandb sync` uploads.
    data = runs[0].read_bytes()
    for key, value in (
        ("fn_mask_digest", record["digest"]),
        ("fn_mask_mode", "key"),
        ("fn_mask_file", str(tmp_path / "mask.json")),
        ("train/loss", None),
    ):
        assert key.encode() in data, key
        assert value is None or json.dumps(value).encode() in data, value
