"""The Trainer's callbacks of our own: a checkpoint on SIGTERM, weight EMA that resumes exactly, a step-counting
progress bar, and progress lines for log files."""
from __future__ import annotations

import signal
import time

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback, EMAWeightAveraging, RichProgressBar
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException


class CheckpointOnSigterm(Callback):
    """SIGTERM (pre-emption, a time limit, `kill`): every rank stops after the same step and saves it.

    Lightning's own handler runs a collective (a broadcast) inside the signal handler, wherever the signal lands:
    on several ranks it meets another rank's gradient collective, and the job hangs or dies of a collective
    mismatch (seen under DDP and FSDP on 2 gloo ranks). This handler only notes the signal. One rank acts on it
    at the end of the step; several agree on it first, in one collective every `every_n_steps` steps (a collective
    costs a host sync, which a step must not pay every time), and all stop after the same step by raising
    Lightning's SIGTERMException, whose `on_exception` saves the step on every rank.
    """

    def __init__(self, path: str, every_n_steps: int):
        self.path = path
        self.every_n_steps = every_n_steps
        self._signalled = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its handlers after on_fit_start and puts the earlier ones back at teardown
        signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self._signalled = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.world_size == 1:
            stop = self._signalled
        elif trainer.global_step % self.every_n_steps == 0:
            signalled = torch.tensor([int(self._signalled)], device=pl_module.device)
            dist.all_reduce(signalled)  # a sum: did any rank get it
            stop = bool(signalled.item())
        else:
            return
        if stop:
            raise SIGTERMException

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


def duration(seconds: float) -> str:
    """12 s, 3 min 5 s, 2 h 10 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class ProgressLines(Callback):
    """Progress as lines, flushed at once, for output that goes to a file (a SLURM .out, nohup), where a progress
    bar shows nothing: every N steps the step, the loss, samples/s over all ranks and the time left; after each
    validation during training its headline figures. Rank 0 prints."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._mark: tuple[int, float] = (0, 0.0)  # (step, time) of the last line
        self._samples = 0
        self._printed_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._samples += batch["pixels"].size(0) * trainer.world_size
        step = trainer.global_step
        if step % self.every_n_steps or step == self._printed_step or not trainer.is_global_zero:
            return
        (last_step, last_time), now = self._mark, time.perf_counter()
        # the one host sync of the line, every N steps: the loss of this step
        loss = f"loss {outputs['loss'].item():.4f}" if outputs and "loss" in outputs else "loss skipped"
        line = f"step {step}/{trainer.max_steps if trainer.max_steps > 0 else '?'}  {loss}  " \
               f"{self._samples / (now - last_time):.0f} samples/s"
        if trainer.max_steps > 0 and step > last_step:
            line += f"  ETA {duration((trainer.max_steps - step) * (now - last_time) / (step - last_step))}"
        print(line, flush=True)
        self._mark, self._samples, self._printed_step = (step, now), 0, step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not trainer.is_global_zero:
            return  # the final validation is printed by the run's report
        metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/")}
        if "mean_recall@1" not in metrics:
            return
        line = (f"validation at step {trainer.global_step}: mean R@1 {metrics['mean_recall@1']:.4f} (caption->image "
                f"{metrics['image_retrieval_recall@1']:.4f}, image->caption {metrics['text_retrieval_recall@1']:.4f})")
        zeroshot = [f"{k.removeprefix('zeroshot_').removesuffix('_acc1')} {v:.4f}" for k, v in metrics.items()
                    if k.startswith("zeroshot_")]
        print(line + (f", zero-shot {', '.join(zeroshot)}" if zeroshot else ""), flush=True)


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
