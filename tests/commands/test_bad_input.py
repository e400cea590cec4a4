"""Bad input through the real command lines: exit code 2, one line naming the problem and
the fix, no traceback, and nothing written (or the existing file left as it was)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fn_analyze.cli import app as analyze_app
from fn_train.cli import app as train_app
from tests.helpers.activations import write_activations
from tests.helpers.masks import make_mask, write_mask
from tests.helpers.processes import ROOT, refused, subprocess_env
from tests.helpers.tiny_models import tiny_model
from tests.helpers.training import train_args

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_llama(tiny_lm_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir)


def _collect_args(tiny_lm_dir: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["collect", "--model", str(tiny_lm_dir), "--dataset", str(dataset), "--out", str(out), *extra]


# --- mask files -------------------------------------------------------------------------

MASK_FILE_PROBLEMS: list[tuple[str, Callable[[dict], object] | str, str]] = [
    ("not-json", "this is not JSON", "is not valid JSON"),
    ("truncated", "truncate", "is not valid JSON"),
    ("not-an-object", "[1, 2]", "top level is not a JSON object"),
    ("schema-version", lambda raw: raw.update(schema_version=3), "unknown schema_version 3 (this tool reads 1 to 2)"),
    ("neuron-out-of-range", lambda raw: raw["networks"][0]["layers"].update({"0": [176]}), "neuron index 176 out of"),
    ("duplicate-neuron", lambda raw: raw["networks"][0]["layers"].update({"0": [4, 4]}), "neuron index 4 listed twice"),
    ("layer-out-of-range", lambda raw: raw["networks"][0]["layers"].update({"2": [1]}), "layer 2 out of range"),
    ("duplicate-network", lambda raw: raw["networks"][1].update(id=0), "network id 0 appears twice"),
]


def _bad_mask(tiny_llama, tmp_path: Path, edit: Callable[[dict], object] | str) -> Path:
    path = tmp_path / "bad.json"
    good = json.dumps(make_mask(tiny_llama, {0: {0: [1, 2], 1: [3]}, 1: {1: [5]}}).to_dict(), indent=2)
    if edit == "truncate":
        path.write_text(good[: len(good) // 2])
    elif isinstance(edit, str):
        path.write_text(edit)
    else:
        raw = json.loads(good)
        edit(raw)
        path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(("case", "edit", "message"), MASK_FILE_PROBLEMS, ids=[c[0] for c in MASK_FILE_PROBLEMS])
def test_bad_mask_file_is_refused_by_show_and_fn_train(
    tiny_llama, tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, case: str, edit, message: str
) -> None:
    mask = _bad_mask(tiny_llama, tmp_path, edit)
    line = refused(runner.invoke(analyze_app, ["show", str(mask)]), message, str(mask))
    out = tmp_path / "ft"
    result = runner.invoke(train_app, train_args(tiny_lm_dir, demo_dir / "train.csv", out, "--mask-file", str(mask)))
    assert refused(result, message) == line  # one loader, one message
    assert not out.exists()


def test_mask_file_that_is_a_folder_or_missing_is_refused(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    for path, message in ((tmp_path, "is an empty folder"), (tmp_path / "none.json", "does not exist")):
        refused(runner.invoke(analyze_app, ["show", str(path)]), f"mask file {path} {message}")
        args = train_args(tiny_lm_dir, demo_dir / "train.csv", tmp_path / "ft", "--mask-file", str(path))
        refused(runner.invoke(train_app, args), f"mask file {path} {message}")
        assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize(
    ("made_for", "message"),
    [
        (lambda: tiny_model("llama"), "(fingerprint=sha256:"),  # same sizes, another vocabulary
        (lambda: tiny_model("llama", num_hidden_layers=3), "(n_layers=3), not for"),
        (lambda: tiny_model("llama", intermediate_size=192), "(intermediate_size=192), not for"),
    ],
    ids=["fingerprint", "layer-count", "intermediate-size"],
)
def test_mask_for_another_model_is_refused_by_fn_train(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, made_for, message: str
) -> None:
    mask = write_mask(made_for(), {0: {0: [1, 2]}}, tmp_path / "other.json")
    out = tmp_path / "ft"
    result = runner.invoke(train_app, train_args(tiny_lm_dir, demo_dir / "train.csv", out, "--mask-file", str(mask)))
    refused(result, message, "use a mask file made for this model")
    assert not out.exists()


@pytest.mark.parametrize(
    ("networks", "message"),
    [
        ("9", "network id 9 is not in the mask file (ids: 0-2)"),
        ("", "--networks is empty"),
        ("5-3", "--networks '5-3': range 5-3 is reversed; write 3-5 (end included)"),
        ("2:5", "--networks 2:5 uses the old a:b range (end excluded); write 2-4 (end included)"),
        ("one", "'one' is not a number or range; write numbers such as 0,2-5,8 or massive"),
        ("2", "network(s) 2 hold no neuron"),
    ],
    ids=["unknown-id", "empty", "reversed-range", "old-range", "not-a-number", "selection-without-neurons"],
)
def test_bad_network_selection_is_refused_by_fn_train(
    tiny_llama, tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, networks: str, message: str
) -> None:
    mask = write_mask(tiny_llama, {0: {0: [1, 2]}, 1: {1: [3]}, 2: {}}, tmp_path / "m.json")
    out = tmp_path / "ft"
    args = train_args(tiny_lm_dir, demo_dir / "train.csv", out, "--mask-file", str(mask), "--networks", networks)
    refused(runner.invoke(train_app, args), message)
    assert not out.exists()


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ("2:5", "--layers 2:5 uses the old a:b range (end excluded); write 2-4 (end included)"),
        ("0,,1", "--layers '0,,1' has an empty item; write numbers such as 0,2-5,8"),
        ("1-0", "--layers '1-0': range 1-0 is reversed; write 0-1 (end included)"),
        ("-1", "--layers '-1': -1 is negative; numbers start at 0"),
        ("0-2", "--layers '0-2': layer 2 is out of range; the model has layers 0-1"),
    ],
    ids=["old-range", "empty-item", "reversed-range", "negative", "out-of-range"],
)
def test_bad_layers_are_refused_by_collect(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, layers: str, message: str
) -> None:
    acts = tmp_path / "acts"
    args = _collect_args(tiny_lm_dir, demo_dir / "data.jsonl", acts, "--layers", layers)
    refused(runner.invoke(analyze_app, args), message)
    assert not acts.exists()


# --- datasets ---------------------------------------------------------------------------

LONG_PROMPTS = "".join(json.dumps({"question": "why " * 60, "answer": "because"}) + "\n" for _ in range(4))
DATASET_PROBLEMS = [
    # (case, file name, content or None for a missing file, collect flags, fn-train flags, message)
    ("missing", "missing.jsonl", None, [], [], "does not exist; give a csv, json, jsonl or parquet file"),
    ("empty-file", "empty.jsonl", "", [], [], "is empty; give a file with at least one record"),
    ("header-only", "header.csv", "question,answer\n", [], [], "has no records"),
    ("unparsable", "broken.jsonl", '{"question": "x", \n', [], [], "JSON parse error"),
    ("unknown-file-type", "data.txt", "question: x\n", [], [], "unknown file type '.txt'"),
    ("unknown-columns", "cols.jsonl", '{"a": "x", "b": "y"}\n', [], [], "has columns a, b, which match no known"),
    (
        "forced-format-missing-columns",
        "qa.jsonl",
        '{"question": "x", "answer": "y"}\n',
        ["--data-format", "alpaca"],
        ["--data_format", "alpaca"],
        "lacks column(s) instruction, output needed by format alpaca (it has question, answer)",
    ),
    (
        "every-prompt-fills-max-length",
        "long.jsonl",
        LONG_PROMPTS,
        ["--max-length", "16"],
        ["--max_seq_length", "16"],
        "every record's prompt is at least --max",
    ),
]


@pytest.mark.parametrize(
    ("case", "name", "content", "collect_flags", "train_flags", "message"),
    DATASET_PROBLEMS,
    ids=[c[0] for c in DATASET_PROBLEMS],
)
def test_bad_dataset_is_refused_by_collect_and_fn_train(
    tiny_lm_dir: Path, tmp_path: Path, case, name, content, collect_flags, train_flags, message: str
) -> None:
    data = tmp_path / name
    if content is not None:
        data.write_text(content)
    acts = tmp_path / "acts"
    collected = refused(runner.invoke(analyze_app, _collect_args(tiny_lm_dir, data, acts, *collect_flags)), message)
    assert not acts.exists()
    out = tmp_path / "ft"
    trained = refused(runner.invoke(train_app, train_args(tiny_lm_dir, data, out, *train_flags)), message)
    assert not out.exists()
    if case == "every-prompt-fills-max-length":  # each names its own flag
        assert "raise --max-length above" in collected and "raise --max_seq_length above" in trained


def test_some_long_prompts_only_warn_and_plain_text_is_truncated(tiny_lm_dir: Path, tmp_path: Path, caplog) -> None:
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(LONG_PROMPTS + json.dumps({"question": "short?", "answer": "yes"}) + "\n")
    result = runner.invoke(analyze_app, _collect_args(tiny_lm_dir, mixed, tmp_path / "a", "--max-length", "32"))
    assert result.exit_code == 0, result.output
    assert "4 of 5 records have a prompt of at least --max-length 32 tokens" in caplog.text
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": "word " * 60}) + "\n" for _ in range(3)))
    result = runner.invoke(analyze_app, _collect_args(tiny_lm_dir, text, tmp_path / "b", "--max-length", "32"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["n_tokens"] == 3 * 32


# --- ica ----------------------------------------------------------------------------------


@pytest.fixture
def small_activations(tmp_path: Path) -> Path:
    data = np.random.default_rng(0).laplace(size=(300, 3 * 20)).astype(np.float32)
    return write_activations(tmp_path / "acts", data, [0, 1, 2], 20)


def _ica(acts: Path, out: Path, *extra: str):
    return runner.invoke(
        analyze_app,
        ["ica", "--activations", str(acts), "--out", str(out), "--n-components", "3", "--runs", "1", *extra],
    )


def test_empty_or_unfinished_activations_folder_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(_ica(empty, tmp_path / "m.json"), f"activations folder {empty} has no manifest.json", "fn-analyze collect")
    (empty / "shard-r00-00000.h5.partial").write_bytes(b"half")
    refused(_ica(empty, tmp_path / "m.json"), "unfinished shard shard-r00-00000.h5.partial")
    assert not (tmp_path / "m.json").exists()


def test_activations_mixed_from_two_runs_are_refused(small_activations: Path, tmp_path: Path) -> None:
    other = write_activations(tmp_path / "other", np.ones((50, 3 * 20), np.float32), [0, 1, 2], 20, rows_per_shard=50)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["run_key"] = "matrix:another-model"
    (other / "manifest.json").write_text(json.dumps(manifest))
    refused(_ica(other, tmp_path / "m.json"), "shard-r00-00000.h5", "another collect run", "empty folder")
    # A finished shard of another run left beside this run's shards.
    (other / "shard-r00-00000.h5").rename(small_activations / "shard-r01-00000.h5")
    refused(_ica(small_activations, tmp_path / "m.json"), "shard-r01-00000.h5, which its manifest does not name")
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda m: m.pop("shards"), "lacks 'shards'"),
        (lambda m: m["shards"][0].pop("file"), "shard entry without a file name"),
        (lambda m: m.update(n_tokens="many"), "lacks 'n_tokens'"),
    ],
)
def test_damaged_manifest_is_refused_with_one_line(small_activations: Path, tmp_path: Path, damage, fragment) -> None:
    path = small_activations / "manifest.json"
    manifest = json.loads(path.read_text())
    damage(manifest)
    path.write_text(json.dumps(manifest))
    refused(_ica(small_activations, tmp_path / "m.json"), fragment, "re-run `fn-analyze collect`")


def test_in_memory_with_the_dask_engine_is_refused(small_activations: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    refused(
        _ica(small_activations, out, "--in-memory", "--engine", "dask"),
        "--in-memory keeps the rows in this process; drop it or --engine dask",
    )
    assert not out.exists()


@pytest.mark.slow  # about 10 s: the connection is given up after its timeout
def test_dask_scheduler_without_the_dask_engine_or_unreachable_is_refused(
    small_activations: Path, tmp_path: Path, monkeypatch
) -> None:
    import distributed
    from dask.utils import parse_timedelta

    out = tmp_path / "m.json"
    refused(
        _ica(small_activations, out, "--dask-scheduler", "tcp://127.0.0.1:1"), "--dask-scheduler needs --engine dask"
    )
    timeouts = []
    client = distributed.Client

    def connecting(*args, **kwargs):
        timeouts.append(kwargs.get("timeout"))
        return client(*args, **kwargs)

    monkeypatch.setattr(distributed, "Client", connecting)
    result = _ica(small_activations, out, "--engine", "dask", "--dask-scheduler", "tcp://127.0.0.1:1")
    refused(result, "cannot reach the dask scheduler at tcp://127.0.0.1:1", "check the address")
    # One attempt, given up after a bounded wait, and nothing written.
    assert len(timeouts) == 1 and parse_timedelta(timeouts[0]) < 30 and not out.exists()


def test_too_many_components_is_refused_by_the_cli(small_activations: Path, tmp_path: Path) -> None:
    out = tmp_path / "masks" / "m.json"
    result = _ica(small_activations, out, "--n-components", "80")
    refused(result, "--n-components 80 is larger than the data allows", "at most 59")
    assert not out.parent.exists()


def test_ica_out_that_is_not_a_mask_file_is_left_alone(small_activations: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    refused(_ica(small_activations, notes), "is an existing file that is not a mask file")
    assert notes.read_text() == '{"my": "notes"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts", "notes.json"]  # no index.json, no temp file

    assert _ica(small_activations, notes, "--overwrite").exit_code == 0  # asked for: replaced by a mask file
    assert json.loads(notes.read_text())["schema_version"] == 2


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_ica_out_that_is_a_folder_is_refused(small_activations: Path, tmp_path: Path, overwrite) -> None:
    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    refused(_ica(small_activations, folder, *overwrite), f"--out {folder} is a folder; give a file path")
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_ica_out_under_a_file_and_a_damaged_index_are_refused_before_the_work(
    small_activations: Path, tmp_path: Path
) -> None:
    (tmp_path / "plain").write_text("x")
    refused(_ica(small_activations, tmp_path / "plain" / "m.json"), "is a file, not a folder")
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "index.json").write_text('{"masks": [')
    refused(_ica(small_activations, masks / "m.json"), "mask index", "is not valid JSON", "--no-register")
    assert sorted(p.name for p in masks.iterdir()) == ["index.json"]


# --- models -------------------------------------------------------------------------------


# Runs a module as `python -m` does, recording in $FN_TEST_CONNECTIONS every host name it looks
# up and every network address it connects to.
RECORDING_CONNECTIONS = """
import os, runpy, socket, sys

log = open(os.environ["FN_TEST_CONNECTIONS"], "a")
lookup, connect = socket.getaddrinfo, socket.socket.connect


def recorded_lookup(host, *args, **kwargs):
    log.write(f"lookup {host}\\n")
    log.flush()
    return lookup(host, *args, **kwargs)


def recorded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        log.write(f"connect {address}\\n")
        log.flush()
    return connect(self, address)


socket.getaddrinfo, socket.socket.connect = recorded_lookup, recorded_connect
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


def _run_recording_connections(connections: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    connections.write_text("")
    return subprocess.run(
        [sys.executable, "-c", RECORDING_CONNECTIONS, module, *args],
        capture_output=True,
        text=True,
        env=subprocess_env(FN_TEST_CONNECTIONS=str(connections)),
        cwd=ROOT,
        timeout=120,
    )


def test_the_connection_record_sees_a_connection(tmp_path: Path) -> None:
    """The check below is not vacuous: a lookup and a connection are recorded."""
    (tmp_path / "connecting.py").write_text(
        "import socket\n\ntry:\n    socket.create_connection(('127.0.0.1', 1))\nexcept OSError:\n    pass\n"
    )
    connections = tmp_path / "connections.txt"
    done = subprocess.run(
        [sys.executable, "-c", RECORDING_CONNECTIONS, "connecting"],
        capture_output=True,
        text=True,
        env=subprocess_env(FN_TEST_CONNECTIONS=str(connections), PYTHONPATH=str(tmp_path)),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert connections.read_text().splitlines() == ["lookup 127.0.0.1", "connect ('127.0.0.1', 1)"]


@pytest.mark.parametrize("command", ["collect", "fn-train"])
def test_unknown_model_offline_fails_fast_with_one_line(demo_dir: Path, tmp_path: Path, command: str) -> None:
    """Without HF_HUB_OFFLINE the hub would be retried for about a minute: offline, the refusal
    comes without a single network request."""
    out = tmp_path / "out"
    if command == "collect":
        args = ["fn_analyze.cli", "collect", "--model", "no-such-org/no-such-model"]
        args += ["--dataset", str(demo_dir / "data.jsonl"), "--out", str(out)]
    else:
        args = ["fn_train.cli", "--model_name_or_path", "no-such-org/no-such-model"]
        args += ["--dataset_name_or_path", str(demo_dir / "train.csv"), "--output_dir", str(out)]
    connections = tmp_path / "connections.txt"
    refused(
        _run_recording_connections(connections, *args),
        "model 'no-such-org/no-such-model' is not a local folder and not in the Hugging Face cache",
        "HF_HUB_OFFLINE is set",
    )
    assert connections.read_text() == "", "the hub was contacted"
    assert not out.exists()


def test_model_path_that_does_not_exist_is_named(demo_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "mine"
    result = runner.invoke(analyze_app, _collect_args(missing, demo_dir / "data.jsonl", tmp_path / "acts"))
    refused(result, f"model folder {missing} does not exist")


# --- ablation and multiple-choice data --------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ablation", "half"], "--ablation 'half' is unknown; use zero, mean or scale"),
        (
            ["--scale-factor", "2", "--ablation", "zero"],
            "--scale-factor is given but --ablation is zero; add --ablation scale",
        ),
        (["--means-from", "acts"], "--means-from is given but --ablation is zero; add --ablation mean"),
    ],
    ids=["unknown-ablation", "factor-without-scale", "means-without-mean"],
)
def test_bad_ablation_flags_are_refused_by_fn_train_and_evaluate(
    tiny_llama, tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    mask = write_mask(tiny_llama, {0: {0: [1, 2]}}, tmp_path / "m.json")
    out = tmp_path / "ft"
    train_flags = [flags[0].replace("-", "_").replace("__", "--"), *flags[1:]]  # the underscore spelling
    refused(
        runner.invoke(
            train_app, train_args(tiny_lm_dir, demo_dir / "train.csv", out, "--mask-file", str(mask), *train_flags)
        ),
        message,
    )
    assert not out.exists()
    if flags[0] != "--means-from":  # evaluate takes its means from --activations
        args = [
            "evaluate",
            "--mask-file",
            str(mask),
            "--dataset",
            str(demo_dir / "eval.csv"),
            "--model",
            str(tiny_lm_dir),
        ]
        refused(runner.invoke(analyze_app, [*args, "--out", str(tmp_path / "r.json"), *flags]), message)
        assert not (tmp_path / "r.json").exists()


def test_ablation_without_a_mask_is_refused_by_fn_train(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    args = train_args(tiny_lm_dir, demo_dir / "train.csv", tmp_path / "ft", "--ablation", "mean")
    refused(runner.invoke(train_app, args), "--ablation given without --mask-file; add --mask-file or drop --ablation")


def test_multiple_choice_answer_out_of_range_is_refused_by_collect_and_fn_train(
    tiny_lm_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"question": "Good?", "choices": ["no", "yes"], "answer": 5}) + "\n")
    message = "answer 5 is neither one of its choices (no, yes) nor an index below 2"
    refused(runner.invoke(analyze_app, _collect_args(tiny_lm_dir, data, tmp_path / "acts")), message)
    assert not (tmp_path / "acts").exists()
    refused(runner.invoke(train_app, train_args(tiny_lm_dir, data, tmp_path / "ft")), message)
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--n-components", "many"], ["--n-components must be an integer or auto, got 'many'"]),
        (["--splits", "1"], ["--splits must be 0 (the whole data only) or at least 2, got 1"]),
        (["--solver", "jade"], ["unknown --solver 'jade'; use one of picard, fastica"]),
        (["--min-share", "1.5"], ["--min-share must lie between 0 and 1, got 1.5"]),
        (["--runs", "0"], ["--runs must be at least 1, got 0"]),
    ],
    ids=["components", "splits", "solver", "share", "runs"],
)
def test_bad_consensus_options_are_refused(small_activations: Path, tmp_path: Path, extra, fragments) -> None:
    refused(_ica(small_activations, tmp_path / "m.json", *extra), *fragments)
    assert not (tmp_path / "m.json").exists()
