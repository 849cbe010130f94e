"""The Lightning Trainer of a run: devices checked against what the machine has, precision, the DDP strategy with
its collective timeout, the logger, and the callbacks (checkpoints, progress, EMA, zero-shot)."""
from __future__ import annotations

import os
import shutil
import sys
from datetime import timedelta

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.callbacks.progress.rich_progress import _RICH_AVAILABLE
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from clipfromscratch.callbacks import CheckpointOnSigterm, ExponentialMovingAverage, ProgressLines, StepProgressBar
from clipfromscratch.config import TrainConfig, parse_devices
from clipfromscratch.errors import UsageError, first_line
from clipfromscratch.eval.callback import ZeroShotCallback
from clipfromscratch.eval.tasks import EvalOptions
from clipfromscratch.lit_module import MONITOR
from clipfromscratch.run_folder import LAST_CKPT, replace_sharded_checkpoint


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16-mixed on a CUDA GPU with native bf16 (Ampere and later), 16-mixed on an older one, and
    32-true otherwise: CPUs without bf16 units run half precision far slower than fp32."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    return "32-true"


def _available(accelerator: str) -> tuple[int, str]:
    """(how many devices `accelerator` has here, what they are called)."""
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        return torch.cuda.device_count(), "CUDA GPUs"
    if accelerator == "mps":
        return int(torch.backends.mps.is_available()), "MPS devices"
    # CPU ranks are processes: more of them than cores only take turns
    return len(os.sched_getaffinity(0)), "CPU cores"


def resolve_devices(devices: str, accelerator: str) -> int | list[int]:
    """--devices as the Trainer takes it, checked against what this machine has: `auto` is every GPU, or one CPU
    process; -1 is all of them (on a CPU, one process per core); a count or an index beyond what there is stops
    here, in one line."""
    parsed = parse_devices(devices)
    available, kind = _available(accelerator)
    if parsed == "auto":
        return max(1, available) if kind != "CPU cores" else 1
    if kind == "CPU cores" and isinstance(parsed, list):
        raise UsageError(f"option devices is '{devices}': a list names GPUs; on a CPU give a number of processes")
    if parsed == -1:
        if not available:
            raise UsageError(f"option devices is -1 (all), and this machine has no {kind}")
        return available
    wanted = max(parsed) + 1 if isinstance(parsed, list) else parsed
    if wanted > available:
        raise UsageError(f"option devices is '{devices}', and this machine has {available} {kind}")
    return parsed


def _logger(config: TrainConfig, output_dir: str) -> Logger:
    if config.run.logger == "tensorboard":
        return TensorBoardLogger(output_dir, name="logs")
    if config.run.logger == "wandb":
        # without credentials, log offline rather than wait on a login prompt or the network
        online = bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE") != "offline"
        return WandbLogger(name=os.path.basename(output_dir), save_dir=output_dir, offline=not online)
    return CSVLogger(output_dir, name="logs")


def to_terminal() -> bool:
    """Whether stdout is a terminal (a progress bar) or a file (a SLURM .out, nohup: lines)."""
    return sys.stdout.isatty()


def callbacks(config: TrainConfig, output_dir: str) -> list[Callback]:
    run, data, optim = config.run, config.data, config.optim
    chosen = [
        # last.ckpt on a step clock of its own, so a killed run resumes from at most that many steps back
        ModelCheckpoint(dirpath=output_dir, every_n_train_steps=run.checkpoint_every_n_steps, save_top_k=0,
                        save_last=True),
        CheckpointOnSigterm(os.path.join(output_dir, LAST_CKPT), run.log_every_n_steps),
        # no ThroughputMonitor: it synchronises the GPU at every step; samples/s are in the progress lines and
        # the run's report
        LearningRateMonitor(logging_interval="step"),
    ]
    if data.validation_data:
        chosen.append(ModelCheckpoint(dirpath=output_dir, filename="best-{step}", monitor=MONITOR, mode="max"))
    if data.zeroshot_data:
        options = EvalOptions(data=data.zeroshot_data, label=data.zeroshot_label, templates=data.zeroshot_templates,
                              num_workers=data.num_workers, seed=run.seed)
        name = os.path.basename(data.zeroshot_data.rstrip("/").replace(":", "/"))
        chosen.append(ZeroShotCallback(name, options, data.zeroshot_every_n_validations))
    if run.early_stopping_patience is not None:
        chosen.append(EarlyStopping(MONITOR, mode="max", patience=run.early_stopping_patience))
    if optim.ema_decay is not None:
        chosen.append(ExponentialMovingAverage(decay=optim.ema_decay))
    if not to_terminal():
        chosen.append(ProgressLines(run.progress_every_n_steps))
    elif _RICH_AVAILABLE:
        # the bar reads the logged loss from the device when it redraws: as often as it is logged, not every step
        chosen.append(StepProgressBar(refresh_rate=run.log_every_n_steps))
    return chosen


class ShardedDataParallel(ModelParallelStrategy):
    """FSDP2 through Lightning, every rank a data-parallel shard (by default the strategy would split a node's
    ranks into tensor parallelism). Its checkpoints are folders every rank writes a part of: written in place, a
    run stopped in the middle of a save would leave old and new shards mixed, so a checkpoint is written beside
    its name and moved there once every part is on disk."""

    def __init__(self, ranks: int, timeout: timedelta):
        super().__init__(data_parallel_size=ranks, tensor_parallel_size=1, timeout=timeout)

    def save_checkpoint(self, checkpoint: dict, filepath: str, storage_options: object = None) -> None:
        path = str(self.broadcast(str(filepath)))
        partial = path + ".partial"
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)  # what a stopped save left
        self.barrier("sharded checkpoint: partial folder cleared")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("sharded checkpoint: every rank's part written")
        if self.is_global_zero:
            replace_sharded_checkpoint(partial, path)


def build_trainer(config: TrainConfig, output_dir: str) -> pl.Trainer:
    run, optim = config.run, config.optim
    devices = resolve_devices(run.devices, run.accelerator)
    strategy = run.strategy
    ranks = (len(devices) if isinstance(devices, list) else devices) * run.num_nodes
    # a rank that waits longer than this for the others in a collective (a dead or stuck rank) ends the run
    timeout = timedelta(seconds=run.ddp_timeout_s)
    if strategy == "fsdp":
        strategy = ShardedDataParallel(ranks, timeout)
    elif strategy == "ddp" or ranks > 1:
        strategy = DDPStrategy(timeout=timeout)
    try:
        return pl.Trainer(
            accelerator=run.accelerator, devices=devices, strategy=strategy, num_nodes=run.num_nodes,
            precision=run.precision, max_steps=run.max_steps, max_epochs=run.max_epochs,
            gradient_clip_val=optim.gradient_clip_val, accumulate_grad_batches=optim.accumulate_grad_batches,
            # Lightning counts the interval in batches: steps, as max_steps counts them
            val_check_interval=run.val_every_n_steps * optim.accumulate_grad_batches, check_val_every_n_epoch=None,
            log_every_n_steps=run.log_every_n_steps, callbacks=callbacks(config, output_dir),
            logger=_logger(config, output_dir), default_root_dir=output_dir, num_sanity_val_steps=0,
            # a bar on a terminal; ProgressLines prints lines to a file instead
            enable_progress_bar=to_terminal(),
            # its FLOPs column reads 0 without an example input; the run prints its own parameter counts
            enable_model_summary=False,
            # "warn": ops without a deterministic kernel warn instead of stopping the run
            deterministic="warn" if run.deterministic else None,
        )
    except (MisconfigurationException, ValueError, TypeError) as err:  # what the accelerator or strategy refuses
        raise UsageError(f"cannot set up training: {first_line(err)}") from None
