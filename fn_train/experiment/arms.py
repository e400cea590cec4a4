"""The runs of an experiment: every arm over every seed and neuron-set size, and each masked arm's
random controls.

A size is the keystone regime (`shared.keystone`): only the strongest neurons of the selected
networks by |z| (a count or a fraction of their union); "all" is the networks themselves. A random
control is a neuron set drawn as `fn-analyze evaluate` draws its controls
(`fn_analyze.neurons.neuron_sets.draw_matched`): as many neurons as the selected set holds in every layer
(`layer`), or in every layer and magnitude bin (`magnitude`), from the neurons the networks could
have held (the mask file's set-aside neurons are left out, unless the networks are them). One set is
drawn per control, size and seed, and every masked arm of that seed and size trains with it, so the
arms' controls are paired; each is written as a one-network mask file in the experiment folder, so
its run records it in `fn_mask.json` like any other mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fn_analyze.neurons import neuron_sets
from fn_analyze.neurons.magnitude import NeuronMagnitude
from shared.masks import MaskFile, Network, NeuronSet, save_mask_file

NETWORKS = "networks"  # a run that trains with the selected networks (its random controls: "random-<control>")
MASKS_FOLDER = "masks"  # the random controls' mask files, inside the experiment folder
CONTROL_STREAM = {"layer": 0, "magnitude": 1}  # seeds each control's draw apart from the other's


@dataclass(frozen=True)
class RunSpec:
    arm: str  # lora | key | complement | tune
    neurons: str  # NETWORKS, random-layer, random-magnitude; "" for plain LoRA (no mask)
    seed: int
    size: str = ""  # the keystone size's label (`size_label`), "" for all of the networks' neurons

    @property
    def trained(self) -> str:
        """The arm and the size of its neuron set: `tune`, `tune top 1%`."""
        return f"{self.arm} {self.size}" if self.size else self.arm

    @property
    def group(self) -> str:
        """The table's row: the arm, its size, and which neurons it trained with."""
        return self.trained if not self.neurons or self.neurons == NETWORKS else f"{self.trained} {self.neurons}"

    @property
    def name(self) -> str:
        """The run's folder and results key."""
        return f"{_file_part(self.group)}-seed{self.seed}"


def size_label(keep: int | float | None) -> str:
    """A keystone size as the report names it: `top 1%`, `top 0.1%`, `top 50`; "" for all the neurons."""
    if keep is None:
        return ""
    return f"top {keep:g}" if isinstance(keep, int) else f"top {100 * keep:g}%"


def _file_part(text: str) -> str:
    return text.replace("%", "pct").replace(" ", "-")


def plan_runs(
    arms: list[str], controls: list[str], seeds: list[int], masked_arms: list[str], sizes: list[str]
) -> list[RunSpec]:
    """Seed by seed (a partial experiment holds every arm of its first seeds), arm by arm, size by size."""
    runs = []
    for seed in seeds:
        for arm in arms:
            if arm not in masked_arms:
                runs.append(RunSpec(arm, "", seed))
                continue
            for size in sizes:
                runs.append(RunSpec(arm, NETWORKS, seed, size))
                runs += [RunSpec(arm, f"random-{control}", seed, size) for control in controls]
    return runs


def control_mask_path(out: Path, control: str, seed: int, size: str = "") -> Path:
    sized = f"-{_file_part(size)}" if size else ""
    return out / MASKS_FOLDER / f"random-{control}{sized}-seed{seed}.json"


def draw_control(
    mask: MaskFile, neurons: NeuronSet, control: str, seed: int, magnitude: NeuronMagnitude | None, bin_width: float
) -> NeuronSet:
    """The random set matched to `neurons` (the selected networks' union) for one control and seed."""
    rng = np.random.default_rng([seed, CONTROL_STREAM[control]])
    return neuron_sets.draw_control(mask, neurons, control, magnitude, bin_width, rng)


def write_control_mask(mask: MaskFile, drawn: NeuronSet, control: str, seed: int, matched: str, path: Path) -> None:
    """The drawn set as a mask file of the mask's model: one network, id 0, and how it was drawn."""
    source = {"random_control": {"matched_on": control, "seed": seed, "matched_to": matched}}
    save_mask_file(MaskFile(model=mask.model, networks=(Network(0, drawn),), source=source), path)
