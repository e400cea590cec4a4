"""collect at scale: a killed run resumes to the rows of an uninterrupted one; subsampling;
several processes under torchrun write per-rank shards that ica reads as one."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fn_analyze.cli import app
from fn_analyze.networks.ica import IcaConfig, run_ica
from fn_analyze.record.activations import open_activations
from fn_analyze.record.collect import CollectConfig, collect
from shared.errors import UserError
from tests.helpers.activations import assert_same_rows, shard_rows
from tests.helpers.processes import refused_by_config, stop_line, subprocess_env, wait_for_file


def _by_token(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows sorted by (sequence, position): the same tokens compare equal whatever the shard order."""
    order = np.lexsort((rows["position"], rows["sequence_index"]))
    return {key: values[order] for key, values in rows.items()}


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fn_analyze.cli", "collect", *args]


ENV = subprocess_env(OMP_NUM_THREADS="1")


# collect as the command line runs it, in a process that kills itself with SIGKILL once the third
# shard is written and flushed but not yet closed or renamed: a kill mid-shard at the same point in
# every run. (A SIGKILL sent from this process after the third shard's file appeared missed it under
# load: a shard's file lives only for its one block's write, so collect had often closed it already.)
_KILLED_IN_THE_THIRD_SHARD = """
import os, signal, sys
from fn_analyze.record.activations import ShardWriter
finish = ShardWriter._finish
def killed_in_the_third_shard(self):
    if len(self.completed) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    finish(self)
ShardWriter._finish = killed_in_the_third_shard
from fn_analyze.cli import main
sys.argv = ["fn-analyze", *sys.argv[1:]]
main()
"""


@pytest.mark.slow  # about 20 s: a collect process over 1,200 records, resumed in this process
def test_sigkill_mid_run_then_same_command_resumes_to_the_uninterrupted_rows(
    tiny_lm_dir: Path, big_data: Path, big_data_collected: Path, tmp_path: Path
) -> None:
    args = ["--dataset", str(big_data), "--model", str(tiny_lm_dir), "--batch-size", "1", "--shard-size-mb", "4"]
    out = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_THE_THIRD_SHARD, "collect", *args, "--out", str(out)],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-r00-00000.h5",
        "shard-r00-00001.h5",
        "shard-r00-00002.h5.partial",
    ]

    with pytest.raises(UserError, match="unfinished collect with other arguments"):
        collect(CollectConfig(dataset=str(big_data), out=out, model=str(tiny_lm_dir), max_length=64, shard_size_mb=1))

    resumed = CliRunner().invoke(app, ["collect", *args, "--out", str(out)])  # in this process: one start less
    assert resumed.exit_code == 0, resumed.output[-2000:]
    assert "resuming from 2 finished shard(s)" in resumed.output, resumed.output

    after, whole = shard_rows(out), shard_rows(big_data_collected)
    assert open_activations(out).n_tokens == open_activations(big_data_collected).n_tokens == len(whole["position"])
    pairs = set(zip(after["sequence_index"].tolist(), after["position"].tolist(), strict=True))
    assert len(pairs) == len(after["position"])  # no duplicate row
    assert_same_rows(after, whole)
    assert not list(out.glob("*.partial"))


@pytest.mark.slow  # about 30 s: two collect processes over 1,200 records (one resumed in this process)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_closes_the_shard_exits_without_traceback_and_the_run_resumes(
    tiny_lm_dir: Path, big_data: Path, big_data_collected: Path, tmp_path: Path, stop: signal.Signals
) -> None:
    args = ["--dataset", str(big_data), "--model", str(tiny_lm_dir), "--batch-size", "1", "--shard-size-mb", "1"]
    out = tmp_path / "stopped"
    process = subprocess.Popen(
        _cli([*args, "--out", str(out)]), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_file(out / "shard-r00-00001.h5.partial", process, created=True)  # one shard finished, the second begun
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + stop, stderr[-2000:]
    line = stop_line(stderr)  # what the user reads after the progress bar and the data's warning
    # The shards closed: the second at least (the stop came after it began; collect may have gone on
    # to later ones before this process, scheduled late under load, sent the signal), none left open.
    kept = sorted(p.name for p in out.iterdir())
    assert len(kept) >= 2 and kept == [f"shard-r00-{i:05d}.h5" for i in range(len(kept))], kept
    assert line.startswith(f"stopped by {stop.name}: collect wrote the batch in flight and kept {len(kept)} finished")
    assert line.endswith(f"in {out}; re-run the same command to resume")
    if stop == signal.SIGINT:
        return
    resumed = CliRunner().invoke(app, ["collect", *args, "--out", str(out)])  # in this process: one start less
    assert resumed.exit_code == 0, resumed.output[-2000:]
    assert f"resuming from {len(kept)} finished shard(s)" in resumed.output
    assert_same_rows(shard_rows(out), shard_rows(big_data_collected))


def test_tokens_per_sequence_records_a_seeded_subset_of_the_full_rows(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    data = str(demo_dir / "data.jsonl")
    collect(CollectConfig(dataset=data, out=tmp_path / "full", model=str(tiny_lm_dir)))
    for name in ("a", "b"):
        collect(CollectConfig(dataset=data, out=tmp_path / name, model=str(tiny_lm_dir), tokens_per_sequence=5))
    full, sample = shard_rows(tmp_path / "full"), shard_rows(tmp_path / "a")
    np.testing.assert_array_equal(sample["position"], shard_rows(tmp_path / "b")["position"])  # seeded
    counts = np.bincount(sample["sequence_index"], minlength=60)
    assert counts.max() == 5 and counts.min() >= 1
    full_index = {
        pair: i for i, pair in enumerate(zip(full["sequence_index"].tolist(), full["position"].tolist(), strict=True))
    }
    at = [full_index[pair] for pair in zip(sample["sequence_index"].tolist(), sample["position"].tolist(), strict=True)]
    np.testing.assert_array_equal(sample["activations"], full["activations"][at])
    np.testing.assert_array_equal(sample["token_ids"], full["token_ids"][at])
    assert len(set(sample["position"].tolist())) > 5  # positions are drawn, not the first five


def test_token_rate_keeps_about_that_share(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    data = str(demo_dir / "data.jsonl")
    full = collect(CollectConfig(dataset=data, out=tmp_path / "full", model=str(tiny_lm_dir)))
    part = collect(CollectConfig(dataset=data, out=tmp_path / "part", model=str(tiny_lm_dir), token_rate=0.25))
    assert 0.2 < part.n_tokens / full.n_tokens < 0.3


def test_subsampling_flags_are_checked() -> None:
    refused_by_config(
        lambda: CollectConfig(dataset="d", out=Path("o"), tokens_per_sequence=4, token_rate=0.5),
        CollectConfig,
        "^--tokens-per-sequence and --token-rate both subsample tokens; give only one$",
    )
    refused_by_config(
        lambda: CollectConfig(dataset="d", out=Path("o"), token_rate=1.5),
        CollectConfig,
        "--token-rate must lie in",
        python="token_rate must lie in (0, 1], got 1.5",
    )


def _planted_model(tiny_lm_dir: Path, folder: Path) -> Path:
    """The tiny LLaMA with 3 groups of 12 neurons per layer whose gate and up rows share a
    direction: each group co-activates, so ICA has networks to find, not noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    generator = torch.Generator().manual_seed(1)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            for group in range(3):
                rows = slice(12 * group, 12 * group + 12)
                scale = 1 + 0.5 * torch.rand(12, 1, generator=generator)
                gate, up = torch.randn(2, 1, hidden, generator=generator)
                own = torch.randn(2, 12, hidden, generator=generator)
                layer.mlp.gate_proj.weight[rows] = 0.5 * (gate + 0.3 * own[0])
                layer.mlp.up_proj.weight[rows] = scale * (up + 0.3 * own[1])
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(folder)
    return folder


@pytest.mark.slow  # about 25 s: two ranks and a collect, then two ica runs
def test_torchrun_two_processes_write_per_rank_shards_that_ica_reads_as_one(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    if shutil.which("torchrun") is None:
        pytest.fail("torchrun is not on PATH; it ships with torch")
    model = str(_planted_model(tiny_lm_dir, tmp_path / "planted"))
    data = str(demo_dir / "data.jsonl")
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "fn_analyze.cli", "collect"]
    args = ["--dataset", data, "--model", model, "--device", "cpu", "--out", str(tmp_path / "ranks")]
    done = subprocess.run(command + args, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    collect(CollectConfig(dataset=data, out=tmp_path / "single", model=model))

    ranks = open_activations(tmp_path / "ranks")
    assert {shard["file"][:9] for shard in ranks.manifest["shards"]} == {"shard-r00", "shard-r01"}
    assert ranks.manifest["world_size"] == 2
    multi, single = _by_token(shard_rows(tmp_path / "ranks")), _by_token(shard_rows(tmp_path / "single"))
    np.testing.assert_array_equal(multi["sequence_index"], single["sequence_index"])
    np.testing.assert_array_equal(multi["position"], single["position"])
    np.testing.assert_allclose(multi["activations"], single["activations"], rtol=1e-3, atol=1e-3)

    # No set-aside: the planted groups' neurons are far above the random model's median neuron, so the default
    # (auto) would set them aside as massive; this test is about ranks and planted networks, not that rule.
    common = dict(n_components=6, register=False, set_aside_top=0)
    masks = [
        run_ica(IcaConfig(activations=tmp_path / name, out=tmp_path / f"{name}.json", **common))
        for name in ("ranks", "single")
    ]
    # Equal-sized networks may swap ids (ties broken by peak z), so compare them as sets.
    networks = [sorted(str(network.layers) for network in mask.networks) for mask in masks]
    assert networks[0] == networks[1]
    found = {
        (layer, neurons[0] // 12): set(neurons)
        for network in masks[0].networks
        for layer, neurons in network.layers.items()
    }
    assert len(masks[0].networks) == len(found) == 6  # one network per planted group, none split over layers
    for (layer, group), neurons in found.items():
        planted = set(range(12 * group, 12 * group + 12))
        assert neurons <= planted and len(neurons) >= 10, (layer, group, sorted(neurons))
