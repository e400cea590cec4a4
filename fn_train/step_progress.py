"""The training and evaluation step bars drawn by `shared.progress` (a redrawn bar on a terminal,
plain lines into a log file or a pipe) instead of the HF Trainer's own tqdm bars, which redraw
with carriage returns wherever stderr goes."""

from __future__ import annotations

from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import has_length

from shared.progress import progress_bar


class StepProgress(ProgressCallback):
    """The Trainer's ProgressCallback (its bars, the log lines it writes above them) with our bars."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = progress_bar(total=state.max_steps, dynamic_ncols=True)
        self.current_step = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and has_length(eval_dataloader):
            if self.prediction_bar is None:
                leave = self.training_bar is None
                self.prediction_bar = progress_bar(total=len(eval_dataloader), leave=leave, dynamic_ncols=True)
            self.prediction_bar.update(1)


def use_our_step_bars(trainer) -> None:
    """Swap the Trainer's ProgressCallback (present when its bars are on) for `StepProgress`."""
    if any(type(callback) is ProgressCallback for callback in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(StepProgress())
