"""Collect: every real token's down-projection input, exactly, in float16 shards; no hook left behind."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import fn_analyze.record.activations as activations_module
import fn_analyze.record.collect as collect_module
from fn_analyze.record.activations import ShardWriter, open_activations
from fn_analyze.record.collect import CollectConfig, collect, parse_layers
from shared.arch import find_down_projections
from shared.data import detect_format, load_dataset_any, render_text, resolve_template, to_example
from shared.errors import UserError
from shared.hooks import captured_down_proj_inputs, count_hooks
from shared.models import load_causal_lm, load_tokenizer
from tests.helpers.processes import record_results


@pytest.fixture
def loaded_models(monkeypatch) -> list:
    """Every model collect loads, so tests can look at it afterwards."""
    return record_results(monkeypatch, collect_module, "load_causal_lm")


def _texts(tiny_lm_dir: Path, data: Path) -> list[str]:
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    records = load_dataset_any(str(data))["train"]
    fmt = detect_format(records.column_names)
    return [render_text(to_example(r, fmt), resolve_template("auto", tokenizer), tokenizer) for r in records]


def test_collect_records_every_real_token_exactly(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, loaded_models
) -> None:
    out = tmp_path / "acts"
    manifest = collect(
        CollectConfig(
            dataset=str(demo_dir / "data.jsonl"),
            out=out,
            model=str(tiny_lm_dir),
            batch_size=4,
            max_length=48,
            shard_size_mb=1,
        )
    ).manifest
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    texts = _texts(tiny_lm_dir, demo_dir / "data.jsonl")
    lengths = [min(len(ids), 48) for ids in tokenizer(texts)["input_ids"]]
    assert manifest["n_tokens"] == sum(lengths)
    assert manifest["n_sequences"] == len(texts) == 60
    assert len(manifest["shards"]) > 1  # 1 MB shards: rotation is exercised
    model = loaded_models[0]
    assert count_hooks(model) == 0

    # Sequence 5 alone, unpadded, must equal its rows in the shards.
    projections = find_down_projections(model)
    ids = tokenizer(texts[5], return_tensors="pt", truncation=True, max_length=48)["input_ids"]
    with captured_down_proj_inputs(projections) as store, torch.no_grad():
        model(input_ids=ids)
        expected = torch.cat([store[0][0], store[1][0]], dim=1).to(torch.float16).numpy()
    acts = open_activations(out)
    rows, positions = [], []
    for shard in manifest["shards"]:
        with h5py.File(out / shard["file"], "r") as handle:
            chosen = handle["sequence_index"][:] == 5
            rows.append(handle["activations"][:][chosen])
            positions.append(handle["position"][:][chosen])
    np.testing.assert_allclose(np.concatenate(rows), expected, rtol=2e-3, atol=2e-3)
    assert np.concatenate(positions).tolist() == list(range(lengths[5]))
    assert acts.n_neurons == 2 * 176


def test_layers_and_max_tokens(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    manifest = collect(
        CollectConfig(
            dataset=str(demo_dir / "data.jsonl"), out=tmp_path / "a", model=str(tiny_lm_dir), layers="1", max_tokens=100
        )
    ).manifest
    assert manifest["layers"] == [1] and manifest["n_tokens"] == 100
    with h5py.File(tmp_path / "a" / manifest["shards"][0]["file"], "r") as handle:
        assert handle["activations"].shape == (100, 176)
        assert handle["activations"].dtype == np.float16
        assert handle["activations"].compression is None


def test_parse_layers() -> None:
    assert parse_layers("0,2-5,8", 10) == [0, 2, 3, 4, 5, 8]
    assert parse_layers(None, 3) == [0, 1, 2] and parse_layers("all", 3) == [0, 1, 2]
    with pytest.raises(UserError, match=r"layers '12': layer 12 is out of range; the model has layers 0-9"):
        parse_layers("12", 10)
    with pytest.raises(UserError, match=r"layers 2:5 uses the old a:b range \(end excluded\); write 2-4"):
        parse_layers("0,2:5,8", 10)


def test_folder_that_is_not_ours_is_refused_and_left_alone(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="notes.txt, which is not ours"):
        collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=out, model=str(tiny_lm_dir)))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "precious"


def test_failure_mid_run_leaves_no_hook_and_no_manifest(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, loaded_models, monkeypatch
) -> None:
    monkeypatch.setattr(activations_module, "FLUSH_BYTES", 1)  # every batch reaches the shard before the failure
    calls = {"n": 0}
    original = ShardWriter.write

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        collect(
            CollectConfig(
                dataset=str(demo_dir / "data.jsonl"), out=tmp_path / "a", model=str(tiny_lm_dir), batch_size=4
            )
        )
    assert count_hooks(loaded_models[0]) == 0
    assert not (tmp_path / "a" / "manifest.json").exists()
    assert list((tmp_path / "a").glob("*.h5")) == []  # the unfinished shard keeps its .partial name
    with pytest.raises(UserError, match="unfinished shard"):
        open_activations(tmp_path / "a")


def test_gpt2_conv1d_model_is_collected_and_trained_with_a_mask(
    tiny_gpt2_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    from fn_analyze.networks.ica import IcaConfig, run_ica
    from fn_train.config import TrainConfig
    from fn_train.trainer import train

    manifest = collect(
        CollectConfig(
            dataset=str(demo_dir / "data.jsonl"), out=tmp_path / "acts", model=str(tiny_gpt2_dir), max_tokens=400
        )
    ).manifest
    assert manifest["model"]["model_type"] == "gpt2" and manifest["model"]["intermediate_size"] == 256
    # A random tiny model has no stable network: this test is about GPT-2's Conv1D path, so keep them all.
    mask = run_ica(
        IcaConfig(
            activations=tmp_path / "acts",
            out=tmp_path / "m.json",
            n_components=4,
            runs=1,
            keep_unstable=True,
            register=False,
        )
    )
    assert mask.networks
    train(
        TrainConfig(
            dataset_name_or_path=str(demo_dir / "train.csv"),
            output_dir=tmp_path / "ft",
            model_name_or_path=str(tiny_gpt2_dir),
            mask_file=tmp_path / "m.json",
            max_steps=1,
            max_seq_length=48,
            device="cpu",
        )
    )
    assert (tmp_path / "ft" / "fn_mask.json").is_file()


def test_the_pass_ends_at_the_last_recorded_layer_and_its_rows_are_exact(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    model = load_causal_lm(str(tiny_lm_dir), torch.float32, torch.device("cpu"))
    projections = find_down_projections(model)
    later = {"layer 1": 0, "final norm": 0}

    def counter(name: str):
        return lambda *_: later.__setitem__(name, later[name] + 1)

    counters = [
        projections[1].module.register_forward_pre_hook(counter("layer 1")),
        model.base_model.norm.register_forward_pre_hook(counter("final norm")),
    ]
    config = CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=tmp_path / "a", model=str(tiny_lm_dir), layers="0")
    manifest = collect(config, model=model, tokenizer=load_tokenizer(str(tiny_lm_dir))).manifest
    assert later == {"layer 1": 0, "final norm": 0}  # nothing after layer 0's down-projection ran
    for counter in counters:
        counter.remove()
    texts = _texts(tiny_lm_dir, demo_dir / "data.jsonl")
    ids = load_tokenizer(str(tiny_lm_dir))(texts[3], return_tensors="pt")["input_ids"]
    with captured_down_proj_inputs(projections) as store, torch.no_grad():
        model(input_ids=ids)
    with h5py.File(tmp_path / "a" / manifest["shards"][0]["file"], "r") as handle:
        rows = handle["activations"][:][handle["sequence_index"][:] == 3]
    np.testing.assert_allclose(rows, store[0][0].to(torch.float16).numpy(), rtol=2e-3, atol=2e-3)
    assert later == {"layer 1": 0, "final norm": 0} and count_hooks(model) == 0
