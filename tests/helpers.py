"""What the tests share: the checkout and its child processes, what a user reads when a command
refuses or stops, tiny models built from configs, masks, activations and training runs on them."""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig

from fn_analyze.record.activations import open_activations
from fn_train.config import TrainConfig
from shared.arch import find_down_projections
from shared.errors import ParameterError
from shared.hooks import pre_hooks
from shared.masks import MaskFile, Network, save_mask_file
from shared.models import model_info
from shared.options import flag_namer

ROOT = Path(__file__).resolve().parents[1]

# --- the checkout's child processes ---------------------------------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that runs this checkout's packages, offline."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


def train_on_two_ranks(args: list[str]) -> str:
    """Run `fn-train args` as two DDP ranks on the CPU (torchrun); its stdout. Fails on a non-zero exit;
    a hung rendezvous does not leave the ranks running."""
    ranks = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    launcher = subprocess.Popen(
        [sys.executable, *ranks, "-m", "fn_train.cli", *args],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 0, stderr[-3000:]
    return stdout


_IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x8, 0x80, 0x100
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name that follows


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 120.0, created: bool = False) -> None:
    """Return once `process` has written `path`: closed it after writing or renamed it into place
    (with `created`: as soon as it is created). The kernel wakes the wait (inotify on the nearest
    folder of `path` that exists, a pidfd for the process): no polling. Fails when the process
    ends first or after `timeout` seconds. A file there before the wait began counts as written."""
    done = _IN_CREATE | _IN_MOVED_TO if created else _IN_CLOSE_WRITE | _IN_MOVED_TO
    libc = ctypes.CDLL(None, use_errno=True)
    watcher = libc.inotify_init1(os.O_CLOEXEC)
    assert watcher >= 0, f"inotify_init1 failed: {os.strerror(ctypes.get_errno())}"
    ended = os.pidfd_open(process.pid)
    deadline = time.monotonic() + timeout
    watched, parent_watch = None, -1
    try:
        while True:
            nearest = next(folder for folder in path.parents if folder.is_dir())
            if nearest != watched:  # a folder on the way appeared: watch the deeper one
                watch = libc.inotify_add_watch(watcher, bytes(nearest), _IN_CREATE | _IN_MOVED_TO | _IN_CLOSE_WRITE)
                watched = nearest
                if nearest == path.parent:
                    parent_watch = watch
                    if path.exists():
                        return
                continue  # the folders may have moved on while the watch was added
            ready, _, _ = select.select([watcher, ended], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"{path} was not written within {timeout:g} s"
            if watcher in ready:
                events, offset = os.read(watcher, 65536), 0
                while offset < len(events):
                    watch, mask, _, length = _INOTIFY_EVENT.unpack_from(events, offset)
                    name = events[offset + _INOTIFY_EVENT.size : offset + _INOTIFY_EVENT.size + length]
                    offset += _INOTIFY_EVENT.size + length
                    if watch == parent_watch and mask & done and name.rstrip(b"\0") == os.fsencode(path.name):
                        return
            assert ended not in ready, f"the process ended before it wrote {path}"
    finally:
        os.close(ended)
        os.close(watcher)


# --- what a user reads ----------------------------------------------------------------------------


def refused(result: Any, *fragments: str, progress_bars: bool = False) -> str:
    """The one output line of a command refused with exit code 2, with no traceback; the line must
    hold every fragment. `result` is a CliRunner result or a finished subprocess (stdout and stderr
    read together); with `progress_bars`, a progress bar's lines (loading weights) may stand
    before it. Printed, so `pytest -s` lists every message users can get."""
    if isinstance(result, subprocess.CompletedProcess):
        exit_code, output, exception = result.returncode, result.stdout + result.stderr, None
    else:
        exit_code, output, exception = result.exit_code, result.output, result.exception
    lines = [line for line in output.splitlines() if line.strip() and not (progress_bars and "it/s]" in line)]
    assert exit_code == 2, f"exit {exit_code}: {output}\n{exception!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    print(f"REFUSED {lines[0]}")
    return lines[0]


def refused_by_config(make: Callable[[], object], config: type, flags: str, python: str | None = None) -> str:
    """The ParameterError that `make()` (a config built from Python, or one of its checks) raises: read
    from Python it names parameters, no flag (and holds `python` when given); worded by the command
    built from `config` (fn-train's TrainConfig with its written spellings), it matches the regex
    `flags`, the line the command line prints. Returns the Python message."""
    with pytest.raises(ParameterError) as info:
        make()
    said = str(info.value)
    assert "--" not in said and (python is None or python in said), said
    worded = info.value.as_flags(flag_namer(config, both_spellings=config is TrainConfig))
    assert re.search(flags, worded), worded
    return said


def stop_line(stderr: str) -> str:
    """The one line a user reads when a run stops (`stopped by ...`) or fails (`error: ...`),
    after the data's and the libraries' warnings and progress bars; no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith(("stopped by", "error:"))]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# --- tiny models, randomly initialised from a config (offline) ------------------------------------

HIDDEN = 64
N_LAYERS = 2
N_HEADS = 4
VOCAB = 128
MAX_POSITIONS = 64

# Generic (transformers' standard names) settings; gpt2 and opt use their own keys below.
_COMMON: dict[str, Any] = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=N_HEADS,
    vocab_size=VOCAB,
    max_position_embeddings=MAX_POSITIONS,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

_PER_TYPE: dict[str, dict[str, Any]] = {
    # n_inner=None: the MLP is 4 * n_embd = 256 wide.
    "gpt2": dict(
        n_embd=HIDDEN,
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        n_inner=None,
        n_positions=MAX_POSITIONS,
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama": dict(_COMMON, intermediate_size=176, num_key_value_heads=2),
    "qwen2": dict(_COMMON, intermediate_size=160, num_key_value_heads=2),
    "gpt_neox": dict(_COMMON, intermediate_size=192),
    "opt": dict(_COMMON, ffn_dim=144, word_embed_proj_dim=HIDDEN),
    "phi": dict(_COMMON, intermediate_size=208),
    "gemma": dict(_COMMON, intermediate_size=224, head_dim=HIDDEN // N_HEADS, num_key_value_heads=1),
    "bert": dict(_COMMON, intermediate_size=240),
    "mistral": dict(_COMMON, intermediate_size=168, num_key_value_heads=2, head_dim=HIDDEN // N_HEADS),
}

MODEL_TYPES: tuple[str, ...] = tuple(_PER_TYPE)

# Qualified name of block {i}'s MLP down-projection in the model built by `tiny_model`.
EXPECTED_DOWN_PROJ: dict[str, str] = {
    "gpt2": "transformer.h.{i}.mlp.c_proj",
    "llama": "model.layers.{i}.mlp.down_proj",
    "qwen2": "model.layers.{i}.mlp.down_proj",
    "gpt_neox": "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
    "opt": "model.decoder.layers.{i}.fc2",
    "phi": "model.layers.{i}.mlp.fc2",
    "gemma": "model.layers.{i}.mlp.down_proj",
    "bert": "bert.encoder.layer.{i}.output.dense",
    "mistral": "model.layers.{i}.mlp.down_proj",
}

# An attention projection of each type (leaf name), e.g. for LoRA target_modules.
ATTENTION_PROJ: dict[str, str] = {
    "gpt2": "c_attn",
    "llama": "o_proj",
    "qwen2": "o_proj",
    "gpt_neox": "query_key_value",
    "opt": "out_proj",
    "phi": "dense",
    "gemma": "o_proj",
    "bert": "query",
    "mistral": "o_proj",
}


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config of `model_type` (2 layers, hidden 64, 4 heads, vocab 128, 64 positions)."""
    if model_type not in _PER_TYPE:
        raise KeyError(f"no tiny config for model_type {model_type!r}; known: {', '.join(MODEL_TYPES)}")
    kwargs = {**_PER_TYPE[model_type], **overrides}
    kwargs.setdefault("attn_implementation", "eager")
    return AutoConfig.for_model(model_type, **kwargs)


def intermediate_size(config: PretrainedConfig) -> int:
    """The MLP width of a config built by `tiny_config`."""
    if config.model_type == "gpt2":
        return config.n_inner or 4 * config.n_embd
    if config.model_type == "opt":
        return config.ffn_dim
    return config.intermediate_size


def tiny_model(model_type: str, **overrides: Any) -> nn.Module:
    """A randomly initialised (seed 0) tiny model in eval mode: a causal LM, or a masked LM for bert."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if model_type == "bert" else AutoModelForCausalLM
    return auto.from_config(config).eval()


# The Python file of a model that ships its own code; it writes the file $FN_TEST_MARKER names, where set.
_OWN_CODE = """
import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

if "FN_TEST_MARKER" in os.environ:
    Path(os.environ["FN_TEST_MARKER"]).write_text("the model's own code ran")


class CustomLlamaConfig(LlamaConfig):
    model_type = "custom-llama"


class CustomLlamaForCausalLM(LlamaForCausalLM):
    config_class = CustomLlamaConfig
"""


def model_with_its_own_code(tiny_lm_dir: Path, folder: Path) -> Path:
    """A copy of the tiny LLaMA whose classes live in the folder's own Python file (`auto_map`):
    transformers runs that code only with trust_remote_code."""
    shutil.copytree(tiny_lm_dir, folder)
    (folder / "custom_llama.py").write_text(_OWN_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="custom-llama",
        architectures=["CustomLlamaForCausalLM"],
        auto_map={
            "AutoConfig": "custom_llama.CustomLlamaConfig",
            "AutoModelForCausalLM": "custom_llama.CustomLlamaForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# --- forward passes through a tiny model ----------------------------------------------------------


def spread_networks(model: nn.Module) -> dict[int, dict[int, list[int]]]:
    """Two networks over the model's width: every 3rd neuron of layer 0 and every 5th of layer 1,
    and three neurons of layer 1."""
    size = intermediate_size(model.config)
    return {0: {0: list(range(0, size, 3)), 1: list(range(1, size, 5))}, 1: {1: [2, 4, 6]}}


def random_ids(model: nn.Module) -> torch.Tensor:
    """Two seeded rows of 12 token ids (no special token) for `model`."""
    return torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@contextmanager
def perturbed_inputs(model: nn.Module, neurons: dict[int, list[int]]) -> Iterator[None]:
    """Add large noise to the given neurons' down-projection inputs (runs before any mask hook)."""
    generator = torch.Generator().manual_seed(1)

    def make(indices):
        def hook(module, args):
            x = args[0].clone()
            x[..., indices] += 10 * torch.randn(x[..., indices].shape, generator=generator)
            return (x, *args[1:])

        return hook

    by_layer = {p.layer: p.module for p in find_down_projections(model)}
    with pre_hooks([(by_layer[layer], make(indices)) for layer, indices in neurons.items()]):
        yield


# --- masks and activations ------------------------------------------------------------------------


def make_mask(model: nn.Module, networks: dict[int, dict[int, list[int]]], name: str = "tiny") -> MaskFile:
    """A mask file for `model` with the given {network id: {layer: [neurons]}}."""
    return MaskFile(
        model=model_info(model, name),
        networks=tuple(
            Network(i, {layer: tuple(sorted(neurons)) for layer, neurons in layers.items()})
            for i, layers in networks.items()
        ),
        source={"method": "test"},
    )


def write_mask(model: nn.Module, networks: dict[int, dict[int, list[int]]], path: Path) -> Path:
    save_mask_file(make_mask(model, networks), path)
    return path


def write_activations(
    folder: Path,
    matrix,
    layers: list[int],
    intermediate_size: int,
    rows_per_shard: int = 1000,
    positions=None,
    token_ids=None,
) -> Path:
    """An activations folder (shards + manifest) holding `matrix` (tokens x neurons), as collect writes it;
    each row's position and token id are 0 unless given."""
    from fn_analyze.record.activations import write_matrix
    from shared.masks import ModelInfo

    info = ModelInfo("synthetic", "llama", max(layers) + 1, intermediate_size, 8, "sha256:synthetic")
    return write_matrix(folder, matrix, info, layers, rows_per_shard, positions, token_ids)


def shard_rows(folder: Path) -> dict[str, np.ndarray]:
    """Every dataset of an activations folder, concatenated in manifest order."""
    acts = open_activations(folder)
    parts: dict[str, list[np.ndarray]] = {}
    for shard in acts.manifest["shards"]:
        with h5py.File(folder / shard["file"], "r") as handle:
            for key in ("activations", "token_ids", "sequence_index", "position"):
                parts.setdefault(key, []).append(handle[key][:])
    return {key: np.concatenate(values) for key, values in parts.items()}


def assert_same_rows(rows: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """The same tokens in the same order, and activations equal to float16 rounding."""
    for key in ("token_ids", "sequence_index", "position"):
        np.testing.assert_array_equal(rows[key], expected[key])
    np.testing.assert_allclose(rows["activations"], expected["activations"], rtol=1e-3, atol=1e-3)


# --- training runs --------------------------------------------------------------------------------

# Networks of the masks the training tests write: {network id: {layer: [neurons]}}.
MASKED = {0: {0: [0, 5, 9, 40, 100], 1: [3, 4, 170]}, 1: {1: [7, 8, 9]}}

# Parameter name suffix -> the axis holding one entry per MLP neuron (LLaMA, GPT-2's Conv1D).
NEURON_AXIS = {
    "mlp.gate_proj.weight": 0,
    "mlp.up_proj.weight": 0,
    "mlp.down_proj.weight": 1,
    "mlp.c_fc.weight": 1,
    "mlp.c_fc.bias": 0,
    "mlp.c_proj.weight": 0,
}


def small_run(model_dir: Path, demo_dir: Path, out: Path, mask: Path | None, **overrides) -> TrainConfig:
    settings = dict(
        model_name_or_path=str(model_dir),
        dataset_name_or_path=str(demo_dir / "train.csv"),
        output_dir=out,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,  # large, so that every open parameter visibly moves
        weight_decay=0.0,
        max_seq_length=64,
        logging_steps=1,
        device="cpu",
        mask_file=mask,
    )
    return TrainConfig(**{**settings, **overrides})


def train_args(model: Path, dataset: Path, out: Path, *extra: str, max_steps: int = 1) -> list[str]:
    """fn-train's command line for a short run on the CPU."""
    return [
        "--model_name_or_path", str(model), "--dataset_name_or_path", str(dataset), "--output_dir", str(out),
        "--max_steps", str(max_steps), "--device", "cpu", *extra,
    ]  # fmt: skip


def neuron_parameters(model: nn.Module) -> dict[str, tuple[int, int, torch.Tensor]]:
    """name -> (layer, neuron axis, a copy) of every MLP parameter that holds per-neuron entries."""
    found = {}
    for name, parameter in model.named_parameters():
        suffix = next((s for s in NEURON_AXIS if name.endswith(s)), None)
        if suffix is not None:
            layer = int(re.search(r"\.(?:h|layers)\.(\d+)\.", name).group(1))
            found[name] = (layer, NEURON_AXIS[suffix], parameter.detach().clone())
    return found


def assert_masked_frozen_and_open_moved(before: dict, after: dict, frozen_by_layer: dict[int, list[int]]) -> None:
    """Every frozen neuron's entries are bit-identical; some open neuron's entries moved."""
    assert before and before.keys() == after.keys()
    moved_open = False
    for name, (layer, axis, old) in before.items():
        new = after[name][2]
        frozen = torch.tensor(sorted(frozen_by_layer.get(layer, [])), dtype=torch.long)
        open_ = torch.tensor([n for n in range(old.shape[axis]) if n not in set(frozen.tolist())], dtype=torch.long)
        if len(frozen):
            assert torch.equal(old.index_select(axis, frozen), new.index_select(axis, frozen)), (
                f"{name}: a masked neuron's parameters moved"
            )
        moved_open |= not torch.equal(old.index_select(axis, open_), new.index_select(axis, open_))
    assert moved_open, "no open parameter moved: the check would pass vacuously"


def masked_by_layer(networks: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for network in networks:
        for layer, neurons in MASKED[network].items():
            out.setdefault(layer, []).extend(neurons)
    return out


def train_masked_and_check(model_dir: Path, demo_dir: Path, tmp_path: Path, use_peft: bool, **settings) -> Path:
    """Train the full model (or LoRA merged in) with networks 0 and 1 of MASKED off and weight
    decay 0.5, then check that every masked neuron's parameters are bit-identical and some open
    one's moved. Returns the output folder."""
    from fn_train.trainer import train

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    out = tmp_path / "out"
    train(
        small_run(
            model_dir,
            demo_dir,
            out,
            mask,
            use_peft=use_peft,
            merge_adapter=use_peft,  # the saved model is then the full one, LoRA merged in
            lora_dropout=0.0,
            weight_decay=0.5,
            networks="0,1",
            **settings,
        )
    )
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert_masked_frozen_and_open_moved(neuron_parameters(base), neuron_parameters(tuned), masked_by_layer([0, 1]))
    return out


# --- results --------------------------------------------------------------------------------------


def record_results(monkeypatch, module, name: str) -> list:
    """Wrap `module.name` so that every value it returns is also appended to the returned list."""
    results: list = []
    original = getattr(module, name)

    def recording(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, name, recording)
    return results


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def assert_every_printed_figure_is_stored(results: dict, table: str) -> None:
    """Every number an evaluate table prints is a figure of its results JSON (rounded as printed,
    or as a percentage); strings of the results (names, paths, sources) may hold digits and are
    not figures."""

    def leaves(value) -> list:
        if isinstance(value, dict):
            return [leaf for v in value.values() for leaf in leaves(v)]
        if isinstance(value, list):
            return [leaf for v in value for leaf in leaves(v)]
        return [value]

    stored = [float(v) for v in leaves(results) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for text in sorted((v for v in leaves(results) if isinstance(v, str) and v), key=len, reverse=True):
        table = table.replace(text, " ")
    printed = re.findall(r"(?<![\w.-])-?\d+(?:\.\d+)?", table)
    assert len(printed) > 40
    for text in printed:
        decimals = len(text.split(".")[1]) if "." in text else 0
        value = float(text)
        matched = any(round(f, decimals) == value or round(100 * f, decimals) == value for f in stored)
        assert matched, f"{text} is printed but is not a figure of the results JSON"
