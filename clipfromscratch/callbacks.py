"""The Trainer's callbacks of our own: a checkpoint on SIGTERM, weight EMA that resumes exactly, a step-counting
progress bar."""
from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, EMAWeightAveraging, RichProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException


class CheckpointOnSigterm(Callback):
    """SIGTERM (pre-emption, a time limit, `kill`) makes Lightning stop after the current step: save that step."""

    def __init__(self, path: str):
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path, weights_only=False)
            if trainer.is_global_zero:
                print(f"SIGTERM at step {trainer.global_step}: saved {self.path}; continue with --resume", flush=True)


class StepProgressBar(RichProgressBar):
    """In a run bounded by --max-steps, the bar says which step of how many (Lightning's says "Epoch 0/-2")."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_steps > 0:
            return f"step {self.trainer.global_step}/{self.trainer.max_steps}"
        return super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(0))


class ExponentialMovingAverage(EMAWeightAveraging):
    """Lightning's EMA of the weights (`--ema-decay`): validation swaps the averaged weights in, and the end of
    training leaves them in the model, for the final validation and the export. Checkpoints hold the average as
    `state_dict` (what `eval` reads) and the raw weights as `current_model_state`; Lightning's callback writes the
    average as both into a checkpoint saved once training has ended, so here that one keeps the raw weights too,
    and resuming from it continues the same run."""

    def __init__(self, decay: float):
        super().__init__(decay=decay)
        self._raw_state: dict | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state is not None:
            checkpoint["current_model_state"] = self._raw_state
