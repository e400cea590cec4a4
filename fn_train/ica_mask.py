"""`--ica-on-the-fly`: find the networks in the training data itself before training, with
fn-analyze's own `collect` and `run_ica`, and keep the mask file in the output folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fn_analyze.collect import CollectConfig, collect
from fn_analyze.ica import IcaConfig, run_ica
from fn_train.config import TrainConfig
from shared.constants import ICA_MASK_NAME
from shared.distributed import ranks_from_env
from shared.errors import UserError


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
    print(f"fn-train: computing the mask from up to {config.ica_max_tokens} tokens of {config.dataset_name_or_path}")
    with tempfile.TemporaryDirectory(prefix="fn-train-acts-") as scratch:
        activations = Path(scratch) / "activations"
        collect(
            CollectConfig(
                dataset=config.dataset_name_or_path,
                out=activations,
                model=config.model_name_or_path,
                data_format=config.data_format,
                template_format=config.template_format,
                max_tokens=config.ica_max_tokens,
                max_length=config.max_seq_length,
                dtype=config.torch_dtype,
                device=config.device,
            )
        )
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
