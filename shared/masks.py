"""The mask artifact: a versioned JSON file naming, per network, the neurons of each layer.

Format (schema version 2)::

    {
      "schema_version": 2,
      "created_by": "functional-networks 0.1.0",
      "model": {"name", "model_type", "n_layers", "intermediate_size", "hidden_size", "fingerprint"},
      "source": {...how it was made: activations manifest, ICA parameters...},
      "networks": [{"id": 0, "size": 12, "layers": {"3": [5, 17, ...], ...},
                    "z": {"3": [3.41, -5.02, ...], ...},
                    "quality": 0.93, "share": 1.0, "stable": true, ...}, ...]
    }

`z` (optional, added within version 2) holds each member neuron's signed z in its network's map,
parallel to `layers`; `shared.keystone.strongest` ranks neurons by it. Files made before it, the
set-aside `massive` group and random-control masks have none.

Version 2 added how sure each network is: `quality` (ICASSO's cluster quality index),
`share` (share of the consensus runs that found it) and `stable`; `source.ica` records
the consensus and the clusters left out as unstable. Version 1 files (one ICA run, with
`stability` and `reappearance` per network) still load: they are migrated on read, their
networks' figures kept as they are. A file of a newer version is refused.

Loading validates everything and fails with one line naming the problem before any
model is loaded; `check_compatible` refuses a mask made for another model.

The file is data: this module imports no torch (a test holds it to that). The per-layer tensors
are `shared.layer_masks`; putting a mask on a model is `shared.masked_model.MaskedModel`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared import __version__
from shared.constants import MASK_SCHEMA_VERSION, PRUNE_MASK_NAME
from shared.errors import ParameterError, UserError
from shared.folders import describe, kind
from shared.jsonio import write_json_atomic
from shared.numbers import parse_numbers

MaskMode = Literal["key", "complement"]
MASK_MODES: tuple[str, ...] = ("key", "complement")
NeuronSet = dict[int, tuple[int, ...]]  # layer -> sorted neuron indices, no empty layer
# The neurons `fn-analyze ica` set aside as massive (in no network), selected by this name like a network
# (`--networks massive`), so that a user can study them on purpose.
MASSIVE = "massive"
NetworkId = int | str  # a network's integer id, or MASSIVE


@dataclass(frozen=True)
class ModelInfo:
    """The file's `model` block: what it records of the model it was made for (an activations
    manifest records the same). `shared.models.model_info` makes one from a loaded model."""

    name: str
    model_type: str
    n_layers: int
    intermediate_size: int
    hidden_size: int
    fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Network:
    """One functional network: sorted neuron indices per layer, and (when the ICA recorded it) each
    neuron's signed z in the network's map, parallel to `layers`."""

    id: NetworkId
    layers: dict[int, tuple[int, ...]]
    stats: dict[str, Any] = field(default_factory=dict)  # e.g. peak z-score, stability
    z: dict[int, tuple[float, ...]] | None = None  # layer -> z of each neuron of layers[layer], in its order

    @property
    def size(self) -> int:
        return sum(len(neurons) for neurons in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "size": self.size,
            "layers": {str(layer): list(neurons) for layer, neurons in sorted(self.layers.items())},
        }
        if self.z is not None:
            out["z"] = {str(layer): list(values) for layer, values in sorted(self.z.items())}
        return {**out, **self.stats}


@dataclass(frozen=True)
class MaskFile:
    model: ModelInfo
    networks: tuple[Network, ...]
    source: dict[str, Any] = field(default_factory=dict)
    schema_version: int = MASK_SCHEMA_VERSION
    created_by: str = f"functional-networks {__version__}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "created_by": self.created_by,
            "model": self.model.to_dict(),
            "source": self.source,
            "networks": [network.to_dict() for network in self.networks],
        }

    def network_ids(self) -> list[NetworkId]:
        return [network.id for network in self.networks]

    # The verbs of a data object, as PEFT's configs carry theirs: load, save, select, union, iou/compare. What touches
    # a model is `shared.masked_model.MaskedModel`; the figure is `shared.figures.networks_figure`.

    @classmethod
    def load(cls, path: str | Path) -> MaskFile:
        """Read and validate a mask file (`load_mask_file`)."""
        return load_mask_file(Path(path))

    def save(self, path: str | Path) -> Path:
        """Write the file atomically (a reader never sees half of it); returns the path."""
        save_mask_file(self, Path(path))
        return Path(path)

    def select(self, networks: Iterable[NetworkId] | None) -> MaskFile:
        """The same file with only these networks (ids; MASSIVE: the set-aside neurons; None: all)."""
        chosen = select_networks(self, None if networks is None else list(networks))
        return replace(self, networks=tuple(chosen))

    def union(self, networks: Iterable[NetworkId] | None = None) -> NeuronSet:
        """The neurons of these networks taken together (default all), layer -> sorted neurons."""
        return union(select_networks(self, None if networks is None else list(networks)))

    def iou(self, other: MaskFile) -> np.ndarray:
        """(networks of self, networks of other) IoU of every pair, over (layer, neuron) pairs; both files
        must be of one model."""
        for key in ("n_layers", "intermediate_size", "fingerprint"):
            if getattr(self.model, key) != getattr(other.model, key):
                raise ParameterError(
                    "{other} was made for model {theirs!r} ({key}={b}), this file for {ours!r} ({key}={a}); "
                    "compare mask files of one model",
                    theirs=other.model.name,
                    ours=self.model.name,
                    key=key,
                    a=getattr(self.model, key),
                    b=getattr(other.model, key),
                )
        return iou_matrix(self, other)

    def compare(self, other: MaskFile) -> list[tuple[NetworkId, NetworkId, float]]:
        """(id here, id in other, IoU) of the one-to-one matching that maximizes the summed IoU
        (Hungarian algorithm), best first: a network that came back has a match near 1."""
        from scipy.optimize import linear_sum_assignment

        matrix = self.iou(other)
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        pairs = [
            (self.networks[r].id, other.networks[c].id, float(matrix[r, c])) for r, c in zip(rows, cols, strict=True)
        ]
        return sorted(pairs, key=lambda pair: -pair[2])

    def massive(self) -> Network | None:
        """The neurons the ICA set aside as massive (`source.ica.set_aside`), as a network named
        MASSIVE; None when the file sets none aside."""
        aside = self.source.get("ica", {}).get("set_aside")
        if not aside:
            return None
        where = f"mask file of {self.model.name}, its set-aside neurons"
        return Network(
            MASSIVE, _parse_layers(aside.get("layers"), self.model, MASSIVE, lambda p: UserError(f"{where}: {p}"))
        )


def membership(mask: MaskFile) -> np.ndarray:
    """(networks x all neurons) 0/1 matrix; column = layer * intermediate_size + neuron."""
    size = mask.model.intermediate_size
    matrix = np.zeros((len(mask.networks), mask.model.n_layers * size), dtype=np.float32)
    for row, network in enumerate(mask.networks):
        for layer, neurons in network.layers.items():
            matrix[row, layer * size + np.asarray(neurons, dtype=np.int64)] = 1.0
    return matrix


def iou_matrix(a: MaskFile, b: MaskFile) -> np.ndarray:
    """IoU of network i of `a` with network j of `b` (0 where both are empty)."""
    ma, mb = membership(a), membership(b)
    inter = ma @ mb.T
    unions = ma.sum(axis=1)[:, None] + mb.sum(axis=1)[None, :] - inter
    return np.divide(inter, unions, out=np.zeros_like(inter), where=unions > 0).astype(np.float64)


def union(networks: Iterable[Network]) -> NeuronSet:
    """The neurons of `networks` taken together (a neuron in several networks counts once)."""
    merged: dict[int, set[int]] = {}
    for network in networks:
        for layer, neurons in network.layers.items():
            merged.setdefault(layer, set()).update(neurons)
    return {layer: tuple(sorted(ns)) for layer, ns in sorted(merged.items()) if ns}


def made_for(mask: MaskFile) -> MaskMode | None:
    """The use a mask file's recorded preprocessing suits (docs/science.md, "Defaults, and why"):
    `complement` for every layer weighted alike (`ica --scale layer`), `key` for the massive
    neurons set aside (the default); None for neither (their networks' effect is mostly the
    massive neurons' magnitude) or a file that records no ICA preprocessing."""
    ica = mask.source.get("ica", {})
    if ica.get("scale") == "layer":
        return "complement"
    return "key" if ica.get("set_aside") else None


def save_mask_file(mask: MaskFile, path: Path) -> None:
    write_json_atomic(Path(path), mask.to_dict())


def load_mask_file(path: Path) -> MaskFile:
    """Read and validate a mask file; every problem is one UserError line naming the file."""
    path = Path(path)
    found = kind(path)
    if found != "file":
        raise UserError(f"mask file {path} {describe(found)}; give the path of a file written by `fn-analyze ica`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"mask file {path} is not valid JSON ({exc}); it may be truncated: regenerate it with `fn-analyze ica`"
        ) from exc
    return parse_mask(raw, str(path))


def parse_mask(raw: Any, where: str) -> MaskFile:
    def bad(problem: str) -> UserError:
        return UserError(f"mask file {where}: {problem}")

    if not isinstance(raw, dict):
        raise bad("top level is not a JSON object; regenerate it with `fn-analyze ica`")
    version = raw.get("schema_version")
    if version not in MIGRATIONS and version != MASK_SCHEMA_VERSION:
        raise bad(
            f"unknown schema_version {version!r} (this tool reads 1 to {MASK_SCHEMA_VERSION}); "
            "upgrade functional-networks or regenerate the file"
        )
    while version in MIGRATIONS:
        raw, version = MIGRATIONS[version](raw), version + 1
    model_raw = raw.get("model")
    keys = ("name", "model_type", "n_layers", "intermediate_size", "hidden_size", "fingerprint")
    if not isinstance(model_raw, dict) or any(key not in model_raw for key in keys):
        raise bad(f"'model' must hold {', '.join(keys)}; regenerate it with `fn-analyze ica`")
    model = ModelInfo(**{key: model_raw[key] for key in keys})
    if not isinstance(model.n_layers, int) or not isinstance(model.intermediate_size, int):
        raise bad("'model.n_layers' and 'model.intermediate_size' must be integers")
    networks_raw = raw.get("networks")
    if not isinstance(networks_raw, list):
        raise bad("'networks' must be a list")
    networks = []
    seen_ids: set[int] = set()
    for item in networks_raw:
        networks.append(_parse_network(item, model, seen_ids, bad))
    source = raw.get("source", {})
    return MaskFile(
        model=model,
        networks=tuple(networks),
        source=source if isinstance(source, dict) else {},
        schema_version=version,
        created_by=str(raw.get("created_by", "unknown")),
    )


def _migrate_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: nothing is renamed; the file says it was migrated and that its networks
    come from one ICA run (no consensus figures), so `show` prints them as such."""
    source = raw.get("source") if isinstance(raw.get("source"), dict) else {}
    return {**raw, "schema_version": 2, "source": {**source, "migrated_from_schema": 1}}


MIGRATIONS = {1: _migrate_v1}  # version -> function giving the next version's raw object


def _parse_network(item: Any, model: ModelInfo, seen_ids: set[int], bad) -> Network:
    if not isinstance(item, dict) or not isinstance(item.get("id"), int) or not isinstance(item.get("layers"), dict):
        raise bad("each network needs an integer 'id' and a 'layers' object")
    network_id = item["id"]
    if network_id in seen_ids:
        raise bad(f"network id {network_id} appears twice; ids must be unique")
    seen_ids.add(network_id)
    layers = _parse_layers(item["layers"], model, network_id, bad)
    z = None if item.get("z") is None else _parse_z(item["z"], item["layers"], network_id, bad)
    declared = item.get("size")
    stats = {k: v for k, v in item.items() if k not in ("id", "size", "layers", "z")}
    network = Network(network_id, layers, stats, z)
    if declared is not None and declared != network.size:
        raise bad(f"network {network_id}: 'size' is {declared} but its layers hold {network.size} neurons")
    return network


def _parse_layers(raw: Any, model: ModelInfo, network_id: NetworkId, bad) -> dict[int, tuple[int, ...]]:
    """A network's `layers` object, each layer index and neuron index checked against `model`."""
    if not isinstance(raw, dict):
        raise bad(f"network {network_id}: 'layers' must be an object of layer -> neuron indices")
    layers: dict[int, tuple[int, ...]] = {}
    for layer_key, neurons in raw.items():
        try:
            layer = int(layer_key)
        except ValueError:
            raise bad(f"network {network_id}: layer key {layer_key!r} is not an integer") from None
        if not 0 <= layer < model.n_layers:
            raise bad(f"network {network_id}: layer {layer} out of range (model has {model.n_layers} layers)")
        if not isinstance(neurons, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in neurons):
            raise bad(f"network {network_id}, layer {layer}: neurons must be a list of integers")
        out_of_range = [n for n in neurons if not 0 <= n < model.intermediate_size]
        if out_of_range:
            raise bad(
                f"network {network_id}, layer {layer}: neuron index {out_of_range[0]} out of range "
                f"(intermediate size {model.intermediate_size})"
            )
        if len(set(neurons)) != len(neurons):
            duplicate = next(n for n in neurons if neurons.count(n) > 1)
            raise bad(f"network {network_id}, layer {layer}: neuron index {duplicate} listed twice")
        if neurons:
            layers[layer] = tuple(sorted(neurons))
    return layers


def _parse_z(raw: Any, layers_raw: dict, network_id: NetworkId, bad) -> dict[int, tuple[float, ...]]:
    """A network's `z` object (its `layers` already checked): the same layers, one finite number per
    neuron in the order `layers` lists them; returned in the sorted neuron order `Network.layers` keeps."""
    fix = "regenerate the file with `fn-analyze ica`, or delete the network's 'z'"
    if not isinstance(raw, dict) or set(raw) != set(layers_raw):
        raise bad(f"network {network_id}: 'z' must hold the layers of 'layers' ({', '.join(layers_raw)}); {fix}")
    z: dict[int, tuple[float, ...]] = {}
    for layer_key, values in raw.items():
        neurons = layers_raw[layer_key]
        if (
            not isinstance(values, list)
            or len(values) != len(neurons)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        ):
            raise bad(
                f"network {network_id}, layer {layer_key}: 'z' must be {len(neurons)} finite numbers, one per "
                f"neuron of 'layers'; {fix}"
            )
        if neurons:
            z[int(layer_key)] = tuple(float(v) for _, v in sorted(zip(neurons, values, strict=True)))
    return z


def check_compatible(mask: MaskFile, target: ModelInfo, where: str = "mask file") -> None:
    """Refuse a mask made for another architecture, naming what differs and where a fitting one is:
    a pruned model's own mask file (the mask remapped to its neurons) sits in its folder."""
    for key in ("model_type", "n_layers", "intermediate_size", "hidden_size", "fingerprint"):
        expected, actual = getattr(mask.model, key), getattr(target, key)
        if expected != actual:
            pruned_mask = Path(target.name) / PRUNE_MASK_NAME
            fix = (
                f"use the pruned folder's own mask file, {pruned_mask}"
                if kind(Path(target.name)) == "pruned model" and pruned_mask.is_file()
                else "use a mask file made for this model (`fn-analyze ica`)"
            )
            raise UserError(
                f"{where} was made for model {mask.model.name!r} ({key}={expected}), not for "
                f"{target.name!r} ({key}={actual}); {fix}"
            )


def parse_network_ids(text: str | None) -> list[NetworkId] | None:
    """`"0,3,5-7"` -> [0, 3, 5, 6, 7] (`shared.numbers`: ranges include their end); `"massive"` names the
    set-aside neurons (listed after the numbers); None or "all" -> None (every network).

    An empty value is an error, not "all": it selects nothing.
    """
    if text is None or text.strip().lower() == "all":
        return None
    if not text.strip():
        raise ParameterError(
            "{networks} is empty; give ids like 0,3,5-7 or {massive}, or all (the default)", massive=MASSIVE
        )
    ids: list[NetworkId] = list(parse_numbers(text, "networks", names=(MASSIVE,)))
    named = any(part.strip().lower() == MASSIVE for part in text.split(","))
    return ids + [MASSIVE] if named else ids


def select_networks(mask: MaskFile, ids: list[NetworkId] | None) -> list[Network]:
    """The networks with the given ids (all when None; MASSIVE: the set-aside neurons); unknown ids
    and empty selections are errors."""
    if ids is None:
        selected = list(mask.networks)
    else:
        by_id = {network.id: network for network in mask.networks}
        massive = mask.massive()
        if massive is not None:
            by_id[MASSIVE] = massive
        elif MASSIVE in ids:
            raise UserError(
                f"--networks {MASSIVE}: the mask file sets no neuron aside (made with --set-aside 0, or on data "
                "without massive activations); see `fn-analyze show`"
            )
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise UserError(
                f"network id {unknown[0]} is not in the mask file (ids: {_id_range(mask.network_ids())}); "
                "see `fn-analyze show`"
            )
        selected = [by_id[i] for i in dict.fromkeys(ids)]
    if not selected:
        raise UserError("the mask file holds no network; make one with more components (`fn-analyze ica`)")
    if sum(network.size for network in selected) == 0:
        chosen = ",".join(str(network.id) for network in selected)
        raise UserError(
            f"network(s) {chosen} hold no neuron, so the mask would change nothing; "
            "choose other networks with --networks (see `fn-analyze show`)"
        )
    return selected


def _id_range(ids: list[NetworkId]) -> str:
    if not ids:
        return "none"
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(str(i) for i in ids)
