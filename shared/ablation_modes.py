"""The names of the ablations (what a mask does to the neurons it selects; `shared.ablation` applies
them) and the check of the parameters that choose one. Imports nothing heavy: the configs check
`ablation` and `scale_factor` with it when they are made."""

from __future__ import annotations

import math

from shared.errors import ParameterError

ABLATIONS: tuple[str, ...] = ("zero", "mean", "scale")
DEFAULT_SCALE_FACTOR = 2.0  # amplify twofold, as Liu et al. do, when --scale-factor is not given


def check_ablation(mode: str, scale_factor: float | None) -> float | None:
    """Validate the parameters `ablation` (its `mode`) and `scale_factor` together; returns the factor
    to use (None unless `scale`)."""
    if mode not in ABLATIONS:
        raise ParameterError("{ablation} {mode!r} is unknown; use zero, mean or scale", mode=mode)
    if mode != "scale":
        if scale_factor is not None:
            raise ParameterError(
                "{scale_factor} is given but {ablation} is {mode}; add {ablation} scale or drop {scale_factor}",
                mode=mode,
            )
        return None
    factor = DEFAULT_SCALE_FACTOR if scale_factor is None else float(scale_factor)
    if not math.isfinite(factor):
        raise ParameterError("{scale_factor} must be a finite number, got {value}", value=scale_factor)
    return factor
