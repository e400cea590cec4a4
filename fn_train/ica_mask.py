"""`--ica-on-the-fly`: find the networks in the training data itself before training, with
fn-analyze's own `collect` and `run_ica`, and keep the mask file in the output folder."""

from __future__ import annotations

import tempfile
from dataclasses import fields
from pathlib import Path

from fn_analyze.networks.ica import IcaConfig, run_ica
from fn_analyze.record.collect import CollectConfig, collect
from fn_train.config import TrainConfig
from shared.constants import ICA_MASK_NAME
from shared.distributed import ranks_from_env
from shared.errors import UserError
from shared.progress import progress_log

# The training settings collect takes under another name (TrainConfig's -> CollectConfig's).
RENAMED_FOR_COLLECT = {
    "dataset_name_or_path": "dataset",
    "model_name_or_path": "model",
    "max_seq_length": "max_length",
    "torch_dtype": "dtype",
    "ica_max_tokens": "max_tokens",
}

say = progress_log("train")


def collect_config(config: TrainConfig, out: Path) -> CollectConfig:
    """The collect run of --ica-on-the-fly: every setting the two configs share is carried over,
    those of the same name (data and template format, device, seed, trust_remote_code, and any
    added later) and those renamed (RENAMED_FOR_COLLECT), so collect reads the training data and
    loads the model exactly as training does; the others keep collect's defaults."""
    names = {field.name for field in fields(CollectConfig)}
    settings = {field.name: getattr(config, field.name) for field in fields(TrainConfig) if field.name in names}
    settings.update({ours: getattr(config, theirs) for theirs, ours in RENAMED_FOR_COLLECT.items()})
    return CollectConfig(out=out, **settings)


def ica_mask_path(config: TrainConfig) -> Path:
    return config.output_dir / ICA_MASK_NAME


def mask_from_training_data(config: TrainConfig, resuming: bool) -> Path:
    """Record the first `ica_max_tokens` tokens of the training data, rendered as training
    renders them, run ICA on them and write the mask to the output folder. A resumed run
    reuses the mask its first part computed. The activations live in a temporary folder."""
    out = ica_mask_path(config)
    if resuming:
        if not out.is_file():
            raise UserError(
                f"--ica-on-the-fly with --resume_from_checkpoint: {out} is missing; "
                "resume with the same --output_dir as the first part of the run"
            )
        return out
    if ranks_from_env().distributed:
        raise UserError(
            "--ica-on-the-fly runs in a single process; compute the mask first (one process, or fn-analyze) "
            "and pass it to the multi-process run with --mask-file"
        )
    say.info(f"fn-train: computing the mask from up to {config.ica_max_tokens} tokens of {config.dataset_name_or_path}")
    with tempfile.TemporaryDirectory(prefix="fn-train-acts-") as scratch:
        activations = Path(scratch) / "activations"
        collect(collect_config(config, activations))
        run_ica(
            IcaConfig(
                activations=activations,
                out=out,
                n_components=config.ica_components,
                seed=config.seed,
                register=False,
                overwrite=True,
            )
        )
    return out
