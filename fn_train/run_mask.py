"""The mask a run trains with: its record (`fn_mask.json`), kept in every checkpoint, and
the check that refuses to resume a checkpoint made with another mask."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from transformers import TrainerCallback

from shared.ablation import Ablation, ablation_digest_payload, ablation_from_record, ablation_record
from shared.constants import CHECKPOINT_PREFIX, RUN_MASK_NAME, TRAINER_STATE_NAME
from shared.digests import bytes_digest
from shared.errors import UserError
from shared.folders import expect
from shared.jsonio import write_json_atomic
from shared.keystone import Keep, strongest
from shared.layer_masks import LayerMasks, build_layer_masks
from shared.masks import (
    MaskFile,
    Network,
    NetworkId,
    NeuronSet,
    load_mask_file,
    made_for,
    parse_mask,
    select_networks,
)

# Only the union kept (complement, mean ablation) against magnitude-matched random keeps, on the demo data
# (docs/science.md, "Defaults, and why"): masks made with --scale layer, and with the defaults.
COMPLEMENT_RECIPE_KEPT = 0.50
COMPLEMENT_DEFAULT_KEPT = 1.09
# key and complement switch neurons off (shared.masks.MASK_MODES); tune switches nothing off and trains
# only the chosen neurons' own weights (shared.neuron_deltas).
TrainMode = Literal["key", "complement", "tune"]


@dataclass(frozen=True)
class RunMask:
    mask: MaskFile
    source: Path  # the mask file it came from
    mode: TrainMode
    networks: list[NetworkId] | None  # None: every network of the file
    # With the ablation applied (zero, mean or scale). In tune mode the 0s mark the tuned neurons.
    layer_masks: LayerMasks
    means_source: str | None = None  # with mean ablation: where the means were measured
    random_neurons: str | None = None  # tune mode: None (the networks' neurons), or what the random set matches
    random_seed: int | None = None  # the seed of that random set
    keystone: Keep | None = None  # --keystone: only the networks' strongest neurons by |z| (shared.keystone)
    keystone_neurons: NeuronSet | None = None  # the neurons --keystone selected (a random control matches them)

    @property
    def tunes(self) -> bool:
        return self.mode == "tune"

    @property
    def chosen_neurons(self) -> NeuronSet:
        """The neurons the 0s mark: switched off (key), left out (complement) or tuned (tune)."""
        found = {
            layer: tuple((vector == 0).nonzero().flatten().tolist())
            for layer, vector in self.layer_masks.vectors.items()
        }
        return {layer: neurons for layer, neurons in sorted(found.items()) if neurons}

    def with_neurons(self, neurons: NeuronSet, random_neurons: str, seed: int) -> RunMask:
        """Tune mode: the same run with another set of neurons tuned (a random control)."""
        layer_masks = build_layer_masks(self.mask, [Network(-1, neurons)], "key")
        return replace(self, layer_masks=layer_masks, random_neurons=random_neurons, random_seed=seed)

    def with_ablation(self, ablation: Ablation) -> RunMask:
        """The same neurons, intervened on by `ablation`."""
        source = ablation.means.source if ablation.means is not None else None
        return replace(self, layer_masks=ablation.apply(self.layer_masks), means_source=source)

    @property
    def digest(self) -> str:
        """What the run switches off, and on which architecture: two runs with the same digest
        train the same neurons, whatever files their masks came from."""
        closed = {
            str(layer): (vector == 0).nonzero().flatten().tolist()
            for layer, vector in sorted(self.layer_masks.vectors.items())
        }
        # Tune mode's 0s are the tuned neurons: the same neurons tuned, the same digest, however they were drawn.
        payload = {"fingerprint": self.mask.model.fingerprint, "mode": self.mode, "switched_off": closed}
        payload.update(ablation_digest_payload(self.layer_masks))  # nothing for zero: older digests still match
        return bytes_digest(json.dumps(payload, sort_keys=True).encode())

    def label(self) -> str:
        return _label(
            self.source,
            self.mode,
            self.networks,
            self.layer_masks.ablation,
            self.layer_masks.scale_factor,
            self.random_neurons,
            self.random_seed,
            self.keystone,
        )

    def describe(self) -> str:
        if self.tunes:
            return f"{self.label()}: only {self.layer_masks.masked_neurons} neurons' own weights train; none is off"
        closed = self.layer_masks.fully_closed_layers
        ablation = self.layer_masks.ablation
        if ablation == "scale":
            done = f"scaled by {self.layer_masks.scale_factor:g}"
        else:
            done = f"set to their mean (from {self.means_source})" if ablation == "mean" else "switched off"
        if len(closed) == 1:
            layers, whole = f"layer {closed[0]} has", {"zero": "its MLP is off", "mean": "its MLP output is constant"}
        else:
            layers = f"layers {','.join(map(str, closed))} have"
            whole = {"zero": "their MLPs are off", "mean": "their MLP outputs are constant"}
        return f"{self.label()}: {self.layer_masks.masked_neurons} neurons {done}" + (
            f"; {layers} no selected neuron, so {whole.get(ablation, 'all their neurons are scaled')}" if closed else ""
        )

    def recipe_note(self) -> str | None:
        """One line when a keep-only run uses a mask not made for it (a note, not an error)."""
        if self.mode != "complement" or made_for(self.mask) == "complement":
            return None
        return (
            f"note: {self.source} was not made with `fn-analyze ica --scale layer`, the keep-only recipe: on the "
            f"demo data, keeping only such networks cost {COMPLEMENT_RECIPE_KEPT:.2f}x the extra loss of random keeps "
            f"of the same magnitudes, the default's networks {COMPLEMENT_DEFAULT_KEPT:.2f}x (docs/science.md)"
        )

    def record(self, baked: bool = False, base_model: str | None = None) -> dict[str, Any]:
        """The content of `fn_mask.json`: enough to re-apply the mask (`fn_train.load`); in tune mode
        also the neurons tuned and `base_model`, the model their deltas are loaded onto."""
        return {
            "mode": self.mode,
            "networks": self.networks,
            "masked_neurons": self.layer_masks.masked_neurons,
            "fully_closed_layers": list(self.layer_masks.fully_closed_layers),
            "digest": self.digest,
            "baked": baked,  # True: the saved weights already hold the mask; no hook is needed
            "mask_file": str(self.source),
            "mask": self.mask.to_dict(),
            # zero | mean | scale, and what it needs to be reproduced: the factor, or every masked neuron's mean
            **ablation_record(self.layer_masks, self.means_source),
            **self._keystone_record(),
            **(self._tune_record(base_model) if self.tunes else {}),
        }

    def _keystone_record(self) -> dict[str, Any]:
        """--keystone: the setting and the neurons it selected (switched off, kept, or tuned unless a random
        control was drawn for them); nothing without it."""
        if self.keystone_neurons is None:
            return {}
        return {
            "keystone": self.keystone,
            "keystone_neurons": {str(layer): list(neurons) for layer, neurons in self.keystone_neurons.items()},
        }

    def _tune_record(self, base_model: str | None) -> dict[str, Any]:
        """Tune mode: which neurons trained (the random set drawn, for a control), so the deltas can be loaded."""
        return {
            "base_model": base_model,
            "random_neurons": self.random_neurons,
            "random_seed": self.random_seed,
            "tuned_neurons": {str(layer): list(neurons) for layer, neurons in self.chosen_neurons.items()},
        }


def _label(
    source: Any,
    mode: Any,
    networks: list[NetworkId] | None,
    ablation: Any = "zero",
    scale_factor: Any = None,
    random_neurons: Any = None,
    random_seed: Any = None,
    keystone: Any = None,
) -> str:
    ids = "all" if networks is None else ",".join(map(str, networks))
    if keystone is not None:
        ids += f", keystone {keystone}"
    if random_neurons is not None:
        ids += f", random neurons matched on {random_neurons}, seed {random_seed}"
    how = (
        ""
        if ablation in (None, "zero")
        else f", ablation {ablation}"
        + (f" x{scale_factor:g}" if ablation == "scale" and isinstance(scale_factor, (int, float)) else "")
    )
    return f"mask {source} ({mode}{how}, networks {ids})"


def resolve_run_mask(
    source: Path,
    mode: TrainMode,
    networks: list[NetworkId] | None,
    ablation: Ablation | None = None,
    keystone: Keep | None = None,
) -> RunMask:
    """Load and validate the mask file and the selection (with `keystone`: only the networks' strongest
    neurons); no model needed. A mean ablation is added later (`with_ablation`), once its means are measured."""
    mask = load_mask_file(source)
    selected, keystone_neurons = _selection(mask, networks, keystone, f"mask file {source}")
    layer_masks = build_layer_masks(mask, selected, "key" if mode == "tune" else mode)
    run_mask = RunMask(mask, source, mode, networks, layer_masks, keystone=keystone, keystone_neurons=keystone_neurons)
    return run_mask.with_ablation(ablation) if ablation is not None else run_mask


def _selection(
    mask: MaskFile, networks: list[NetworkId] | None, keystone: Keep | None, where: str
) -> tuple[list[Network], NeuronSet | None]:
    """The networks a run masks, or with `keystone` their strongest neurons as one set (and that set)."""
    selected = select_networks(mask, networks)
    if keystone is None:
        return selected, None
    neurons = strongest(selected, keystone, where)
    return [Network(-1, neurons)], neurons


def run_mask_from_record(record: dict[str, Any], where: str) -> RunMask:
    """The RunMask a saved `fn_mask.json` describes, its ablation included."""
    mask = parse_mask(record.get("mask"), where)
    mode, networks, keystone = record.get("mode"), record.get("networks"), record.get("keystone")
    selected, keystone_neurons = _selection(mask, networks, keystone, where)
    if mode == "tune":
        from shared.neuron_deltas import neurons_from_record

        layer_masks = build_layer_masks(mask, [Network(-1, neurons_from_record(record, where))], "key")
        return RunMask(
            mask, Path(str(record.get("mask_file", where))), mode, networks, layer_masks,
            random_neurons=record.get("random_neurons"), random_seed=record.get("random_seed"),
            keystone=keystone, keystone_neurons=keystone_neurons,
        )  # fmt: skip
    layer_masks = build_layer_masks(mask, selected, mode)
    run_mask = RunMask(
        mask, Path(str(record.get("mask_file", where))), mode, networks, layer_masks,
        keystone=keystone, keystone_neurons=keystone_neurons,
    )  # fmt: skip
    return run_mask.with_ablation(ablation_from_record(record, layer_masks, where))


class MaskRecordInCheckpoints(TrainerCallback):
    """Write `fn_mask.json` into each checkpoint folder as the Trainer decides to save it,
    before it writes the checkpoint (trainer_state.json last): a complete checkpoint of a
    masked run always holds its mask record."""

    def __init__(self, run_mask: RunMask, base_model: str | None = None) -> None:
        self.record = run_mask.record(base_model=base_model)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if control.should_save and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            write_json_atomic(folder / RUN_MASK_NAME, self.record)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint (one holding trainer_state.json) with the highest step."""
    complete = [
        (int(path.name[len(CHECKPOINT_PREFIX) :]), path)
        for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if path.name[len(CHECKPOINT_PREFIX) :].isdigit() and (path / TRAINER_STATE_NAME).is_file()
    ]
    return max(complete)[1] if complete else None


def remove_incomplete_checkpoints(output_dir: Path) -> None:
    """Delete the checkpoint folders a failed save left without trainer_state.json (written last)."""
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if path.is_dir() and not (path / TRAINER_STATE_NAME).is_file():
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(requested: str, output_dir: Path) -> Path:
    """The checkpoint folder `--resume_from_checkpoint` names ("last": the latest complete one)."""
    if requested == "last":
        found = latest_checkpoint(output_dir) if output_dir.is_dir() else None
        if found is None:
            raise UserError(
                f"--resume_from_checkpoint last: {output_dir} holds no complete checkpoint; "
                "give a checkpoint folder or drop the flag"
            )
        return found
    path = Path(requested)
    expect(
        path, "--resume_from_checkpoint", {"checkpoint"}, f"a complete checkpoint (with {TRAINER_STATE_NAME})",
        f"give a {CHECKPOINT_PREFIX}<step> folder of an earlier run, or last",
    )  # fmt: skip
    return path


def check_same_mask(checkpoint: Path, run_mask: RunMask | None) -> None:
    """Refuse to resume a checkpoint that was trained with another mask (or with none, or
    without one when this run has one)."""
    saved = checkpoint / RUN_MASK_NAME
    recorded = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else None
    before = recorded.get("digest") if recorded else None
    now = run_mask.digest if run_mask else None
    if before == now:
        return
    if recorded is None:
        raise UserError(
            f"checkpoint {checkpoint} was trained without a mask; resume it without --mask-file, "
            "or start a new run in another --output_dir"
        )
    past = _label(
        recorded.get("mask_file"),
        recorded.get("mode"),
        recorded.get("networks"),
        recorded.get("ablation", "zero"),
        recorded.get("scale_factor"),
        recorded.get("random_neurons"),
        recorded.get("random_seed"),
        recorded.get("keystone"),
    )
    if run_mask is None:
        raise UserError(f"checkpoint {checkpoint} was trained with {past}; pass the same mask flags to resume it")
    raise UserError(
        f"checkpoint {checkpoint} was trained with {past}, not with {run_mask.label()}; "
        "pass the same mask flags to resume it, or start a new run in another --output_dir"
    )
