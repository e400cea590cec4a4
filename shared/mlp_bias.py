"""A bias on every MLP down-projection, in a form a plain `from_pretrained` loads.

A neuron's constant contribution (its mean activation times its down-projection column) can only
live in the down-projection's bias. GPT-2, GPT-NeoX, OPT, Phi and others have one; a LLaMA-family
config with `mlp_bias: false` (llama, granite) is switched to true, and the MLP layers it then
expects a bias on (gate, up and down) get zero biases. Architectures whose MLP bias no config
setting turns on (mistral, qwen2, gemma, phi3, ...) cannot carry one and are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.arch import DownProjection, base_layer, config_of, find_down_projections
from shared.errors import UserError


def can_add_mlp_biases(model: nn.Module, projections: list[DownProjection] | None = None) -> bool:
    """Whether every down-projection has a bias or the config can turn one on."""
    projections = projections or find_down_projections(model)
    if all(base_layer(p.module).bias is not None for p in projections):
        return True
    return getattr(config_of(model), "mlp_bias", None) is not None


def add_mlp_biases(model: nn.Module, why: str, fix: str, projections: list[DownProjection] | None = None) -> None:
    """Give every down-projection a bias (zero where one is added). `why` and `fix` complete the
    one-line refusal of an architecture that cannot carry one: "<why>, but <type>'s down-projection
    has none ...; <fix>"."""
    projections = projections or find_down_projections(model)
    if all(base_layer(p.module).bias is not None for p in projections):
        return
    config = model.config
    if not can_add_mlp_biases(model, projections):
        raise UserError(
            f"{why}, but {config.model_type}'s down-projection has none and its config cannot turn one on; {fix}"
        )
    config.mlp_bias = True
    with torch.device("meta"):
        expected = {name for name, _ in type(model)(config).named_parameters()}
    for name in sorted(expected - {name for name, _ in model.named_parameters()}):
        owner = model.get_submodule(name.rpartition(".")[0]) if name.endswith(".bias") else None
        if not isinstance(owner, nn.Linear) or owner.bias is not None:
            raise UserError(
                f"{why}: {config.model_type} with mlp_bias expects parameter {name}, "
                f"which cannot be added as a zero bias; {fix}"
            )
        owner.bias = nn.Parameter(
            torch.zeros(owner.out_features, dtype=owner.weight.dtype, device=owner.weight.device),
            requires_grad=owner.weight.requires_grad,
        )
