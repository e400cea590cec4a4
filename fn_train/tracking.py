"""What a run hands to its trackers (tensorboard, wandb, ...) and to its own loop: the mask it
trains with, logged as run config, and the stop a scheduler's SIGTERM asks for."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainerCallback
from trl import SFTConfig

from fn_train.run_mask import RunMask
from shared.signals import StopRequest


@dataclass
class MaskedSFTConfig(SFTConfig):
    """TRL's config plus the mask: every tracker logs the Trainer's arguments as the run's
    config (wandb's config, tensorboard's `args` text and hparams), so a tracked run says what
    was switched off. Unset (None) for a run without a mask."""

    fn_mask_file: str | None = None
    fn_mask_mode: str | None = None
    fn_networks: str | None = None  # "all" or the ids, e.g. "0,3"
    fn_ablation: str | None = None
    fn_mask_digest: str | None = None  # RunMask.digest: equal digests, equal neurons switched off


def track_mask(args: MaskedSFTConfig, run_mask: RunMask) -> None:
    """Set the mask fields before training starts (the trackers read the arguments then)."""
    args.fn_mask_file = str(run_mask.source)
    args.fn_mask_mode = run_mask.mode
    args.fn_networks = "all" if run_mask.networks is None else ",".join(map(str, run_mask.networks))
    args.fn_ablation = run_mask.layer_masks.ablation
    args.fn_mask_digest = run_mask.digest


class SaveAndStopOnSignal(TrainerCallback):
    """When a stop was requested, save a checkpoint at the end of the current optimizer step and
    end training. Added before MaskRecordInCheckpoints, which then writes the checkpoint's
    `fn_mask.json` as for any save."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.stop:
            control.should_save = True
            control.should_training_stop = True
