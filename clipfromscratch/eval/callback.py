"""Zero-shot accuracy on a named dataset during training, as open_clip does with ImageNet.

Training here is counted in steps (validation every `val_every_n_steps`), so the callback runs after every
N-th validation rather than every N epochs; the accuracy lands in the same log row as validation recall.
"""
from __future__ import annotations

import pytorch_lightning as pl

from clipfromscratch.eval.data import open_labelled
from clipfromscratch.eval.models import from_clip
from clipfromscratch.eval.tasks import EvalOptions, Evaluation, zeroshot


class ZeroShotCallback(pl.Callback):
    """Logs `val/zeroshot_<name>_acc1`; the data is re-read each time, the model being a new one."""

    def __init__(self, name: str, options: EvalOptions, every_n_validations: int = 1):
        self.name = name
        self.options = options
        self.every_n_validations = every_n_validations
        self.validations = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # data that cannot be read stops the run before its first step, not at its first validation
        o = self.options
        open_labelled(o.data, o.label, o.classnames, o.num_samples, o.seed, o.download)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_validations:
            return
        # every rank computes the same number from the same data: nothing to synchronise
        acc1 = zeroshot(Evaluation(from_clip(pl_module.model, "training"), self.options)).metrics["acc1"]
        pl_module.log(f"val/zeroshot_{self.name}_acc1", acc1)
