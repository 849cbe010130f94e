"""`python train.py ...` and `clipfromscratch train ...`: flags and YAML -> data, model, Trainer -> a trained run."""
from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import replace

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from clipfromscratch.config import TrainConfig, load_config, save_config
from clipfromscratch.data.datamodule import CaptionDataModule
from clipfromscratch.errors import UsageError
from clipfromscratch.eval.callback import ZeroShotCallback
from clipfromscratch.eval.tasks import EvalOptions
from clipfromscratch.export import export_model, model_from_checkpoint
from clipfromscratch.lit_module import MONITOR, CLIPModule
from clipfromscratch.model import build_model, resolve_image_size
from clipfromscratch.tokenizers import make_tokenizer

LAST_CKPT = "last.ckpt"
RUN_STAMP_ENV = "CLIPFROMSCRATCH_RUN_STAMP"
SIGTERM_EXIT = 143  # 128 + SIGTERM: the run did not finish, schedulers and torchrun should not take it for done


class CheckpointOnSigterm(Callback):
    """SIGTERM (pre-emption, a time limit, `kill`) makes Lightning stop after the current step: save that step."""

    def __init__(self, path: str):
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            if trainer.is_global_zero:
                print(f"SIGTERM at step {trainer.global_step}: saved {self.path}; continue with --resume", flush=True)


def _resume_checkpoint(resume: str) -> str:
    """A checkpoint file, or a run directory's newest: last.ckpt or the one SLURM pre-emption wrote (hpc_ckpt_N)."""
    if not os.path.isdir(resume):
        if not os.path.isfile(resume):
            raise UsageError(f"no checkpoint to resume from: {resume}")
        return resume
    found = [os.path.join(resume, LAST_CKPT)] + glob.glob(os.path.join(glob.escape(resume), "hpc_ckpt_*.ckpt"))
    found = [path for path in found if os.path.isfile(path)]
    if not found:
        raise UsageError(f"no checkpoint to resume from in {resume} (no {LAST_CKPT} or hpc_ckpt_*.ckpt)")
    return max(found, key=os.path.getmtime)


def _logger(config: TrainConfig, output_dir: str) -> Logger:
    if config.logger == "tensorboard":
        return TensorBoardLogger(output_dir, name="logs")
    if config.logger == "wandb":
        # without credentials, log offline rather than wait on a login prompt or the network
        online = bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE") != "offline"
        return WandbLogger(name=os.path.basename(output_dir), save_dir=output_dir, offline=not online)
    return CSVLogger(output_dir, name="logs")


def _devices(devices: str) -> str | int | list[int]:
    if devices == "auto":
        return devices
    try:
        return [int(d) for d in devices.split(",") if d] if "," in devices else int(devices)
    except ValueError:
        raise UsageError(f"devices is '{devices}': give a number, a list like 0,1, or auto") from None


def _check(config: TrainConfig, has_val: bool) -> None:
    if not has_val and (config.lr_schedule == "plateau" or config.early_stopping_patience is not None):
        raise UsageError("lr_schedule plateau and early stopping watch validation recall: give --val-data")
    if not has_val and config.zeroshot_data:
        raise UsageError("--zeroshot-data runs at validations: give --val-data")
    for name in ("accum_freq", "checkpoint_every_n_steps", "batch_size", "zeroshot_every_n_validations"):
        if getattr(config, name) < 1:
            raise UsageError(f"{name} is {getattr(config, name)}: it must be at least 1")
    if config.max_steps == -1 and config.max_epochs is None:
        raise UsageError("set --max-steps or --max-epochs, or training never ends")


def train(config: TrainConfig) -> dict[str, float]:
    """Train, validate, write metrics.json and the export; returns the final validation metrics."""
    pl.seed_everything(config.seed, workers=True, verbose=False)
    checkpoint = None
    if config.resume:
        ckpt_path = _resume_checkpoint(config.resume)
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        output_dir = config.output_dir or os.path.dirname(ckpt_path)
    else:
        ckpt_path = None
        # Lightning's DDP launcher re-runs this script per rank: the ranks inherit rank 0's time stamp
        stamp = os.environ.setdefault(RUN_STAMP_ENV, time.strftime("%Y%m%d-%H%M%S"))
        run_name = config.run_name or f"{config.image_encoder}-{config.text_encoder}-{stamp}"
        output_dir = config.output_dir or os.path.join("checkpoints", os.path.basename(run_name))
    config = resolve_image_size(replace(config, output_dir=output_dir))
    val_data = config.val_data or ("synthetic" if config.train_data == "synthetic" else None)
    _check(config, val_data is not None)

    # with feature-cached accumulation a step's batch is accum_freq micro-batches
    data = CaptionDataModule(
        config.train_data, val_data, config.batch_size * config.accum_freq, config.num_workers, config.seed,
        config.image_size,
        config.synthetic_train_samples, config.synthetic_val_samples,
        config.csv_img_key, config.csv_caption_key, config.csv_separator,
        config.shuffle_buffer, config.dataset_resampled, config.train_num_samples)
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint)
    else:
        tokenizer = make_tokenizer(config.text_encoder, config.pretrained_text, config.model_size,
                                   data.train_captions(), data.tokenizer_cache_dir)
        model = build_model(config.model_config(), tokenizer)
    data.bind(model)
    model.lock_towers(image=config.lock_image, text=config.lock_text)
    if config.grad_checkpointing:
        model.image_tower.enable_grad_checkpointing()
        model.text_tower.enable_grad_checkpointing()
    module = CLIPModule(model, config.lr, config.weight_decay, config.warmup_steps, config.lr_schedule,
                        config.plateau_patience, config.plateau_factor, data.zeroshot_tasks,
                        config.accum_freq, config.skip_nonfinite)

    os.makedirs(output_dir, exist_ok=True)
    save_config(config, os.path.join(output_dir, "config.yaml"))
    callbacks = [
        # last.ckpt on a step clock of its own, so a killed run resumes from at most that many steps back
        ModelCheckpoint(dirpath=output_dir, every_n_train_steps=config.checkpoint_every_n_steps, save_top_k=0,
                        save_last=True),
        CheckpointOnSigterm(os.path.join(output_dir, LAST_CKPT)),
        LearningRateMonitor(logging_interval="step"),
        ThroughputMonitor(batch_size_fn=lambda batch: 0 if batch is None else batch["pixels"].size(0)),
    ]
    if val_data:
        callbacks.append(ModelCheckpoint(dirpath=output_dir, filename="best-{step}", monitor=MONITOR, mode="max"))
    if config.zeroshot_data:
        options = EvalOptions(data=config.zeroshot_data, label=config.zeroshot_label,
                              templates=config.zeroshot_templates, num_workers=config.num_workers, seed=config.seed)
        name = os.path.basename(config.zeroshot_data.rstrip("/").replace(":", "/"))
        callbacks.append(ZeroShotCallback(name, options, config.zeroshot_every_n_validations))
    if config.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(MONITOR, mode="max", patience=config.early_stopping_patience))
    trainer = pl.Trainer(
        accelerator=config.accelerator, devices=_devices(config.devices), strategy=config.strategy,
        num_nodes=config.num_nodes, precision=config.precision, max_steps=config.max_steps,
        max_epochs=config.max_epochs, gradient_clip_val=config.gradient_clip_val,
        accumulate_grad_batches=config.accumulate_grad_batches, val_check_interval=config.val_every_n_steps,
        check_val_every_n_epoch=None, log_every_n_steps=config.log_every_n_steps, callbacks=callbacks,
        logger=_logger(config, output_dir), default_root_dir=output_dir, num_sanity_val_steps=0,
    )
    first_step = checkpoint["global_step"] if checkpoint else 0
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    trainer.save_checkpoint(os.path.join(output_dir, LAST_CKPT))  # the step clock may have stopped short of the end
    samples = ((trainer.global_step - first_step) * config.batch_size * config.accum_freq
               * config.accumulate_grad_batches)
    samples_per_s = samples * trainer.world_size / (time.perf_counter() - started)

    metrics: dict[str, float] = {}
    if val_data:
        results = trainer.validate(module, datamodule=data, verbose=False)[0]
        metrics = {k.removeprefix("val/"): round(v, 4) for k, v in results.items() if k != MONITOR}
    if trainer.is_global_zero:
        with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump({"step": trainer.global_step, **metrics}, f, indent=2)
        export_model(model, os.path.join(output_dir, "final"))
        print(f"\nrun: {output_dir}  steps: {trainer.global_step}  "
              f"training throughput: {samples_per_s:.0f} samples/s (validation included)")
        for name, value in metrics.items():
            print(f"  {name:32s} {value:.4f}")
        if module.skipped_nonfinite:
            steps = "step" if module.skipped_nonfinite == 1 else "steps"
            print(f"skipped {module.skipped_nonfinite} {steps} with a non-finite loss (--skip-nonfinite)")
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["eval"], ["compare"], ["search"]):
        from clipfromscratch.eval.cli import main as eval_main  # lazy: its plotting is not needed to train

        return eval_main(argv)
    if argv[:1] == ["train"]:  # `clipfromscratch train ...` and `python train.py ...` are the same command
        argv = argv[1:]
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    # advice that does not apply here: few workers on small CPUs, FLOP counting, a Lightning-internal deprecation
    for noise in (".*does not have many workers.*", ".*flops_per_batch.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", noise)
    try:
        train(load_config(argv))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: {err}: lower --lr or set --gradient-clip-val", file=sys.stderr)
        return 1
    except SIGTERMException:
        return SIGTERM_EXIT
    return 0
