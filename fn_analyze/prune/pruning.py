"""`fn-analyze prune`: a smaller model that keeps its functional networks.

MLP neurons are removed physically: their rows of the up/gate projections (both halves of a fused
gate-and-up layer, and their bias entries) and their columns of the down-projection (GPT-2's Conv1D
alike), so the model is smaller and faster, not only masked. Every layer keeps the same number of
neurons (`keep` x its width, rounded), so the result is a plain config with a smaller intermediate
size that `AutoModelForCausalLM.from_pretrained` loads with no custom code.

Which neurons stay, per layer: the selected networks' neurons first (if they alone outnumber the
kept count, their most important ones), then the others by importance (`fn_analyze.prune.importance`:
the expected squared change of the block's output when the neuron alone is removed). With
compensation (the default) each removed neuron's mean contribution, mean activation x its
down-projection column, is added to the down-projection's bias, as Liu et al.'s follow-up and
FLAP do; an architecture whose config cannot carry that bias (mistral, qwen2, gemma, ...) is
refused with the fix, `--no-compensate`. `--random` keeps random neurons, the same count per
layer, compensated alike: the control.

The output folder holds the model and tokenizer, `fn_prune.json` (provenance), the mask file
remapped to the new neuron indices (`fn_prune_mask.json`, for fn-train and evaluate on the
pruned model) and `fn_prune_neurons.npz` (the kept indices, the means used and the importance
ranked on).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fn_analyze.config import PruneConfig
from fn_analyze.neurons.magnitude import NeuronStats, stats_from_activations, stats_from_forward
from fn_analyze.prune.importance import MOMENTS, importance
from fn_analyze.record.activations import open_activations
from shared import __version__
from shared.arch import DownProjection, base_layer, config_of, find_down_projections, mlp_input_projections
from shared.constants import (
    PRUNE_MASK_NAME,
    PRUNE_NEURONS_NAME,
    PRUNE_RECORD_NAME,
    PRUNE_SCHEMA_VERSION,
)
from shared.device import choose_device, choose_dtype
from shared.digests import file_digest
from shared.errors import UserError
from shared.jsonio import atomic_file, write_json_atomic
from shared.masks import (
    MaskFile,
    Network,
    NeuronSet,
    check_compatible,
    load_mask_file,
    parse_network_ids,
    save_mask_file,
    select_networks,
    union,
)
from shared.mlp_bias import add_mlp_biases, can_add_mlp_biases
from shared.models import load_causal_lm, load_tokenizer, model_info

log = logging.getLogger(__name__)

# The config key of the MLP width, where it is not `intermediate_size`.
INTERMEDIATE_SIZE_KEYS: dict[str, str] = {
    "gpt2": "n_inner",
    "gpt_bigcode": "n_inner",
    "gptj": "n_inner",
    "codegen": "n_inner",
    "opt": "ffn_dim",
}
NO_BIAS_FIX = "prune with --no-compensate (the removed neurons' mean contribution is then dropped)"
IMPORTANCE_RULES = {
    True: "Var(a) x |w|^2: expected squared change of the block's output when the neuron is replaced by its mean",
    False: "E[a^2] x |w|^2: expected squared change of the block's output when the neuron is cut",
}


def keep_count(keep: float, size: int) -> int:
    """Neurons each layer keeps: `keep` x the width, rounded, at least 1."""
    return max(1, round(keep * size))


@dataclass(frozen=True)
class KeptNeurons:
    """The neurons each layer keeps (sorted ascending: they keep their order, so the new index of a
    neuron is its rank among the kept) and the selected networks' neurons that did not fit."""

    kept: np.ndarray  # (n_layers, n_keep) int64, each row sorted
    networks_cut: dict[int, int]  # layer -> networks' neurons removed there (they outnumbered the kept count)


def choose_by_importance(scores: np.ndarray, protected: NeuronSet, n_keep: int) -> KeptNeurons:
    """Per layer: the protected neurons first (the most important of them when they do not all fit),
    then the rest by importance, largest first; ties go to the lower index."""
    rows, cut = [], {}
    for layer, layer_scores in enumerate(scores):
        first = np.zeros(len(layer_scores), dtype=bool)
        first[list(protected.get(layer, ()))] = True
        # lexsort's last key is the primary one: protected first, then importance, then the index.
        order = np.lexsort((np.arange(len(layer_scores)), -layer_scores, ~first))
        rows.append(np.sort(order[:n_keep]))
        if first.sum() > n_keep:
            cut[layer] = int(first.sum()) - n_keep
    return KeptNeurons(np.stack(rows).astype(np.int64), cut)


def choose_at_random(
    n_layers: int, size: int, n_keep: int, protected: NeuronSet, seed: int, draw: int = 0
) -> KeptNeurons:
    """Per layer: `n_keep` neurons drawn uniformly (seed, draw and layer decide them; `prune --random
    --seed S` keeps draw 0 of seed S)."""
    draws = [
        np.random.default_rng([seed, draw, layer]).choice(size, n_keep, replace=False) for layer in range(n_layers)
    ]
    kept = np.sort(np.stack(draws), axis=1).astype(np.int64)
    cut = {
        layer: lost for layer, neurons in protected.items() if (lost := len(set(neurons) - set(kept[layer].tolist())))
    }
    return KeptNeurons(kept, cut)


def prune_model(model: nn.Module, kept: np.ndarray, means: np.ndarray | None = None) -> None:
    """Remove every MLP neuron not in `kept` (n_layers x n_keep) from `model`, in place, and write the
    smaller width into its config. With `means` (n_layers x width), each removed neuron's mean
    contribution is added to its down-projection's bias (one is added where the config allows)."""
    projections = find_down_projections(model)
    width = projections[0].in_features
    if kept.shape[0] != len(projections) or kept.shape[1] > width:
        raise UserError(f"kept neurons of shape {kept.shape} do not fit {len(projections)} layers of {width}")
    if means is not None:
        add_mlp_biases(
            model, "compensation writes the removed neurons' mean contribution into the down-projection's bias",
            NO_BIAS_FIX, projections,
        )  # fmt: skip
    with torch.no_grad():
        for projection in projections:
            index = torch.as_tensor(kept[projection.layer], dtype=torch.long)
            down = _plain(base_layer(projection.module), projection.name)
            if means is not None:
                _compensate(down, projection, index, torch.from_numpy(np.asarray(means[projection.layer])))
            _keep_inputs(down, index)
            for source in mlp_input_projections(model, projection):
                _keep_outputs(_plain(base_layer(source), projection.name), index, width)
    _set_intermediate_size(model, kept.shape[1])


def _plain(layer: nn.Module, where: str) -> nn.Module:
    """A float Linear or Conv1D; quantized and other layers cannot be sliced."""
    if type(layer) is not nn.Linear and not isinstance(layer, Conv1D) or not layer.weight.is_floating_point():
        raise UserError(
            f"{where}: {type(layer).__name__} cannot be pruned (quantized or unknown layer); "
            "prune the unquantized model, then quantize the result"
        )
    return layer


def _compensate(down: nn.Module, projection: DownProjection, kept: torch.Tensor, means: torch.Tensor) -> None:
    """bias += sum over the removed neurons j of mean_j x w_j (float64 sum, then cast)."""
    removed = torch.ones(projection.in_features, dtype=torch.bool)
    removed[kept] = False
    off = removed.nonzero().flatten().to(down.weight.device)
    fill = means.to(device=down.weight.device, dtype=torch.float64)[off]
    if projection.orientation == "linear":  # weight (out, in)
        shift = down.weight.double().index_select(1, off) @ fill
    else:  # Conv1D weight (in, out)
        shift = fill @ down.weight.double().index_select(0, off)
    down.bias.add_(shift.to(down.bias.dtype))


def _replace(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(layer, name)
    setattr(layer, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _keep_inputs(down: nn.Module, index: torch.Tensor) -> None:
    """The down-projection keeps the input features (neurons) in `index`."""
    index = index.to(down.weight.device)
    if isinstance(down, Conv1D):  # weight (in, out)
        _replace(down, "weight", down.weight.index_select(0, index))
        down.nx = len(index)
    else:
        _replace(down, "weight", down.weight.index_select(1, index))
        down.in_features = len(index)


def _keep_outputs(source: nn.Module, index: torch.Tensor, width: int) -> None:
    """An up/gate projection keeps the outputs of the neurons in `index` (both halves of a fused one)."""
    out = source.nf if isinstance(source, Conv1D) else source.out_features
    index = index.to(source.weight.device)
    rows = index if out == width else torch.cat([index, index + width])
    if isinstance(source, Conv1D):  # weight (in, out)
        _replace(source, "weight", source.weight.index_select(1, rows))
        source.nf = len(rows)
    else:
        _replace(source, "weight", source.weight.index_select(0, rows))
        source.out_features = len(rows)
    if source.bias is not None:
        _replace(source, "bias", source.bias.index_select(0, rows))


def _set_intermediate_size(model: nn.Module, size: int) -> None:
    """Write the new width into the config and check that the config alone now describes the model:
    a fresh model built from it has every tensor the pruned one has, of the same shape."""
    config = config_of(model)
    key = INTERMEDIATE_SIZE_KEYS.get(config.model_type, "intermediate_size")
    if not hasattr(config, key):
        raise UserError(
            f"{config.model_type}'s config has no {key!r} to write the pruned MLP width into; "
            "this architecture cannot be pruned yet (add its key to fn_analyze/prune/pruning.py INTERMEDIATE_SIZE_KEYS)"
        )
    setattr(config, key, size)
    with torch.device("meta"):
        fresh = type(model)(model.config)
    expected = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
    actual = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    differing = sorted(set(expected.items()) ^ set(actual.items()))
    if differing:
        name = differing[0][0]
        raise UserError(
            f"after pruning, {config.model_type}'s config does not describe the model: tensor {name} is "
            f"{actual.get(name)} in the pruned model but {expected.get(name)} in one built from the config; "
            "this architecture cannot be pruned to a plain config"
        )


def remap_mask(mask: MaskFile, kept: np.ndarray, pruned: Any, record: dict[str, Any]) -> MaskFile:
    """`mask` on the pruned model (`pruned`: its ModelInfo): each network's and the set-aside neurons'
    indices mapped to their new ones, the removed ones left out; `record` goes to `source.pruned`."""
    new_index = [{int(old): new for new, old in enumerate(row)} for row in kept]

    def moved(layers: dict[int, tuple[int, ...]]) -> dict[int, tuple[int, ...]]:
        found = {layer: tuple(new_index[layer][n] for n in ns if n in new_index[layer]) for layer, ns in layers.items()}
        return {layer: ns for layer, ns in sorted(found.items()) if ns}

    source = copy.deepcopy(mask.source)
    massive = mask.massive()
    if massive is not None:
        layers = moved(massive.layers)
        source["ica"]["set_aside"] = {
            **source["ica"]["set_aside"],
            "size": sum(len(ns) for ns in layers.values()),
            "layers": {str(layer): list(ns) for layer, ns in layers.items()},
        }
    source["pruned"] = record
    networks = tuple(Network(network.id, moved(network.layers), network.stats) for network in mask.networks)
    return MaskFile(model=pruned, networks=networks, source=source)


@dataclass(frozen=True)
class PruneResult:
    out: Path
    record: dict[str, Any]  # what fn_prune.json holds


def measure_moments(
    config: PruneConfig, model: nn.Module, projections: list[DownProjection], mask: MaskFile
) -> NeuronStats | None:
    """The neurons' moments from --activations (cached) or a pass over --dataset; None when not needed."""
    if not config.needs_moments:
        return None
    if config.activations is not None:
        missing = sorted(set(range(mask.model.n_layers)) - set(open_activations(config.activations).layers))
        if missing:
            raise UserError(
                f"activations {config.activations} lack layer {missing[0]}, and pruning ranks the neurons of every "
                "layer; collect every layer, or give --dataset to measure on data"
            )
        return stats_from_activations(config.activations, mask.model, MOMENTS, cache=True)
    from fn_analyze.measure.scoring import load_eval_set, make_batches

    tokenizer = load_tokenizer(config.model)
    tokenizer.padding_side = "right"
    eval_set = load_eval_set(
        config.dataset, tokenizer, config.split, config.data_format, config.template_format, config.limit,
        config.max_length,
    )  # fmt: skip
    batches = make_batches(eval_set, config.batch_size, tokenizer.pad_token_id)
    return stats_from_forward(model.base_model, projections, batches, f"a pass over {config.dataset}", MOMENTS)


def prune(config: PruneConfig) -> PruneResult:
    """Prune the model `config` names to `config.keep` of its MLP neurons per layer, keeping the mask
    file's networks; write the pruned folder (model, tokenizer, provenance, remapped mask)."""
    check_out_folder(config.out, config.overwrite)
    mask = load_mask_file(config.mask_file)
    ids = parse_network_ids(config.networks)
    selected = select_networks(mask, ids)
    device = choose_device(config.device)
    model = load_causal_lm(config.model, choose_dtype(config.dtype, device.type), device)
    projections = find_down_projections(model)
    check_compatible(mask, model_info(model, config.model, projections))
    if config.compensate and not can_add_mlp_biases(model, projections):
        raise UserError(
            f"compensation writes the removed neurons' mean contribution into the down-projection's bias, but "
            f"{config_of(model).model_type}'s down-projection has none and its config cannot turn one on; {NO_BIAS_FIX}"
        )
    moments = measure_moments(config, model, projections, mask)
    width = mask.model.intermediate_size
    n_keep = keep_count(config.keep, width)
    protected = union(selected)
    scores = None
    if config.random:
        chosen = choose_at_random(mask.model.n_layers, width, n_keep, protected, config.seed)
    else:
        assert moments is not None
        scores = importance(moments, projections, config.compensate)
        chosen = choose_by_importance(scores, protected, n_keep)
    before = sum(p.numel() for p in model.parameters())
    means = moments.need("mean") if config.compensate and moments is not None else None
    prune_model(model, chosen.kept, means)
    record = _record(config, mask, selected, chosen, moments, width, before, model)
    pruned_mask = remap_mask(mask, chosen.kept, model_info(model, str(config.out)), record)
    tokenizer = load_tokenizer(config.model)
    with staged_folder(config.out) as stage:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        with atomic_file(stage / PRUNE_NEURONS_NAME) as handle:
            arrays = {"kept": chosen.kept}
            if moments is not None:
                arrays["means"] = moments.need("mean")
            if scores is not None:  # for evaluate --pruned's control: the same count kept by importance alone
                arrays["importance"] = scores
            np.savez(handle, **arrays)
        save_mask_file(pruned_mask, stage / PRUNE_MASK_NAME)
        write_json_atomic(stage / PRUNE_RECORD_NAME, record)
    return PruneResult(config.out, record)


def _record(
    config: PruneConfig,
    mask: MaskFile,
    selected: list[Network],
    chosen: KeptNeurons,
    moments: NeuronStats | None,
    width: int,
    before: int,
    model: nn.Module,
) -> dict[str, Any]:
    protected = union(selected)
    n_protected = sum(len(ns) for ns in protected.values())
    return {
        "schema_version": PRUNE_SCHEMA_VERSION,
        "created_by": f"functional-networks {__version__}",
        "base_model": config.model,
        "base_fingerprint": mask.model.fingerprint,
        "mask_file": str(config.mask_file),
        "mask_digest": file_digest(config.mask_file),
        "networks": [network.id for network in selected],
        "keep": config.keep,
        "intermediate_size": {"before": width, "after": int(chosen.kept.shape[1])},
        "selection": f"random (seed {config.seed})" if config.random else "networks first, then importance",
        "importance": None if config.random else IMPORTANCE_RULES[config.compensate],
        "measured_on": moments.source if moments is not None else None,
        "compensation": config.compensate,
        "network_neurons": {
            "selected": n_protected,
            "kept": n_protected - sum(chosen.networks_cut.values()),
            "cut_per_layer": {str(layer): n for layer, n in sorted(chosen.networks_cut.items())},
        },
        "parameters": {"before": before, "after": sum(p.numel() for p in model.parameters())},
        "pruned_mask": PRUNE_MASK_NAME,
        "neurons": PRUNE_NEURONS_NAME,
    }


def check_out_folder(out: Path, overwrite: bool) -> None:
    """Refuse a file, and a folder that holds files unless it is an earlier prune's and --overwrite."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the pruned model")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / PRUNE_RECORD_NAME).is_file():
        raise UserError(f"--out {out} holds files that `fn-analyze prune` did not write; give a new or empty folder")
    if not overwrite:
        raise UserError(f"--out {out} holds an earlier pruned model; pass --overwrite to replace it or choose another")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, put in its place when the block ends (an earlier folder there
    is removed only then); a failure leaves `out` as it was and no temporary folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes the folder private; give it ordinary permissions
    try:
        yield stage
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def format_prune_summary(result: PruneResult) -> str:
    """What a prune did, in a few lines."""
    record = result.record
    sizes, params, kept = record["intermediate_size"], record["parameters"], record["network_neurons"]
    cut = kept["cut_per_layer"]
    lines = [
        f"MLP neurons per layer: {sizes['before']} -> {sizes['after']} "
        f"(keep {record['keep']:g}; {record['selection']})",
        f"parameters: {params['before']:,} -> {params['after']:,} ({params['after'] / params['before']:.1%})",
        f"networks {','.join(str(i) for i in record['networks'])}: {kept['kept']} of their {kept['selected']} "
        "neurons kept" + (f" ({len(cut)} layers had more than the kept count)" if cut else ""),
        f"compensation: {'mean contribution folded into the down-projection bias' if record['compensation'] else 'off'}"
        + (f"; measured on {record['measured_on']}" if record["measured_on"] else ""),
        f"model: {result.out}\nmask: {result.out / record['pruned_mask']}",
    ]
    return "\n".join(lines)
