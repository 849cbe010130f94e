"""`python train.py ...` and `clipfromscratch train ...`: flags and YAML -> data, model, Trainer -> a trained run.

`train` goes through the steps of a run in order: the run folder, the Trainer (which knows this process's rank
before any process group exists), the data, the model with a tokenizer shared by every rank, fitting, and the
report (metrics.json, the export).
"""
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
from pytorch_lightning.callbacks.progress.rich_progress import _RICH_AVAILABLE
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from clipfromscratch.callbacks import CheckpointOnSigterm, ExponentialMovingAverage, StepProgressBar
from clipfromscratch.config import TrainConfig, load_config, parse_devices, save_config
from clipfromscratch.data.datamodule import CaptionDataModule
from clipfromscratch.errors import UsageError, first_line
from clipfromscratch.eval.callback import ZeroShotCallback
from clipfromscratch.eval.tasks import EvalOptions
from clipfromscratch.export import export_model, model_from_checkpoint, read_checkpoint
from clipfromscratch.lit_module import MONITOR, CLIPModule
from clipfromscratch.model import CLIP, build_model, resolve_image_size
from clipfromscratch.text_tokenizers import make_tokenizer, shared_tokenizer

LAST_CKPT = "last.ckpt"
RUN_TOKENIZER = "tokenizer"  # the run folder's tokenizer, written by rank 0 and read by every rank
RUN_STAMP_ENV = "CLIPFROMSCRATCH_RUN_STAMP"
SIGTERM_EXIT = 143  # 128 + SIGTERM: the run did not finish, schedulers and torchrun should not take it for done
EVAL_COMMANDS = ("eval", "compare", "search")


def compile_towers(model: CLIP) -> None:
    """torch.compile each tower in place (`Module.compile`: parameter names, and so checkpoints and exports, keep
    no `_orig_mod.` prefix). Compilation happens at the first step; a platform that cannot compile is found here,
    on a small function, and the run goes on eager."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as err:  # noqa: BLE001 - inductor fails with the errors of its toolchain, whatever they are
        print(f"--compile: torch.compile does not work here, training eager ({first_line(err)})", file=sys.stderr)
        return
    model.image_tower.compile()
    model.text_tower.compile()


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16-mixed on a CUDA GPU with native bf16 (Ampere and later), 16-mixed on an older one, and
    32-true otherwise: CPUs without bf16 units run half precision far slower than fp32."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    return "32-true"


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


def _run_folder(config: TrainConfig, ckpt_path: str | None) -> tuple[str, bool]:
    """The run folder, and whether it was named by this process's clock (which ranks started apart do not share)."""
    run = config.run
    if run.output_dir:
        return run.output_dir, False
    if ckpt_path:
        return os.path.dirname(ckpt_path), False
    if run.run_name:
        return os.path.join("checkpoints", os.path.basename(run.run_name)), False
    # Lightning's DDP launcher re-runs this script per rank: the ranks inherit rank 0's time stamp
    stamp = os.environ.setdefault(RUN_STAMP_ENV, time.strftime("%Y%m%d-%H%M%S"))
    return os.path.join("checkpoints", f"{config.model.image_encoder}-{config.model.text_encoder}-{stamp}"), True


def _logger(config: TrainConfig, output_dir: str) -> Logger:
    if config.run.logger == "tensorboard":
        return TensorBoardLogger(output_dir, name="logs")
    if config.run.logger == "wandb":
        # without credentials, log offline rather than wait on a login prompt or the network
        online = bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE") != "offline"
        return WandbLogger(name=os.path.basename(output_dir), save_dir=output_dir, offline=not online)
    return CSVLogger(output_dir, name="logs")


def _callbacks(config: TrainConfig, output_dir: str) -> list[Callback]:
    run, data, optim = config.run, config.data, config.optim
    callbacks = [
        # last.ckpt on a step clock of its own, so a killed run resumes from at most that many steps back
        ModelCheckpoint(dirpath=output_dir, every_n_train_steps=run.checkpoint_every_n_steps, save_top_k=0,
                        save_last=True),
        CheckpointOnSigterm(os.path.join(output_dir, LAST_CKPT)),
        LearningRateMonitor(logging_interval="step"),
        ThroughputMonitor(batch_size_fn=lambda batch: 0 if batch is None else batch["pixels"].size(0)),
    ]
    if data.validation_data:
        callbacks.append(ModelCheckpoint(dirpath=output_dir, filename="best-{step}", monitor=MONITOR, mode="max"))
    if data.zeroshot_data:
        options = EvalOptions(data=data.zeroshot_data, label=data.zeroshot_label, templates=data.zeroshot_templates,
                              num_workers=data.num_workers, seed=run.seed)
        name = os.path.basename(data.zeroshot_data.rstrip("/").replace(":", "/"))
        callbacks.append(ZeroShotCallback(name, options, data.zeroshot_every_n_validations))
    if run.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(MONITOR, mode="max", patience=run.early_stopping_patience))
    if optim.ema_decay is not None:
        callbacks.append(ExponentialMovingAverage(decay=optim.ema_decay))
    if _RICH_AVAILABLE:
        callbacks.append(StepProgressBar())
    return callbacks


def _trainer(config: TrainConfig, output_dir: str) -> pl.Trainer:
    run, optim = config.run, config.optim
    return pl.Trainer(
        accelerator=run.accelerator, devices=parse_devices(run.devices), strategy=run.strategy,
        num_nodes=run.num_nodes, precision=run.precision, max_steps=run.max_steps, max_epochs=run.max_epochs,
        gradient_clip_val=optim.gradient_clip_val, accumulate_grad_batches=optim.accumulate_grad_batches,
        val_check_interval=run.val_every_n_steps, check_val_every_n_epoch=None,
        log_every_n_steps=run.log_every_n_steps, callbacks=_callbacks(config, output_dir),
        logger=_logger(config, output_dir), default_root_dir=output_dir, num_sanity_val_steps=0,
        # its FLOPs column reads 0 without an example input; the run prints its own parameter counts
        enable_model_summary=False,
        # "warn": ops without a deterministic kernel warn instead of stopping the run
        deterministic="warn" if run.deterministic else None,
    )


def _model(config: TrainConfig, data: CaptionDataModule, trainer: pl.Trainer, checkpoint: dict | None,
           output_dir: str) -> CLIP:
    """The resumed architecture, or a new model whose tokenizer rank 0 makes once for every rank."""
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint)
    else:
        m = config.model
        tokenizer = shared_tokenizer(
            lambda: make_tokenizer(m.text_encoder, m.pretrained_text, m.model_size, data.train_captions(),
                                   data.tokenizer_cache_dir),
            os.path.join(output_dir, RUN_TOKENIZER), trainer.global_rank)
        model = build_model(m, tokenizer)
    optim = config.optim
    model.lock_towers(optim.lock_image, optim.lock_text, optim.lock_image_unlocked_groups,
                      optim.lock_text_unlocked_layers)
    if optim.grad_checkpointing:
        model.image_tower.enable_grad_checkpointing()
        model.text_tower.enable_grad_checkpointing()
    if config.run.compile:
        compile_towers(model)
    if trainer.is_global_zero:
        print(_parameter_counts(model), flush=True)
    return model


def _parameter_counts(model: CLIP) -> str:
    def millions(module: torch.nn.Module, trainable: bool = False) -> str:
        return f"{sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable) / 1e6:.2f}M"

    c = model.config
    return (f"model: image tower {c.image_encoder} {millions(model.image_tower)}, text tower {c.text_encoder} "
            f"{millions(model.text_tower)}, {millions(model)} in all, {millions(model, trainable=True)} trainable")


def _report(trainer: pl.Trainer, module: CLIPModule, data: CaptionDataModule, config: TrainConfig,
            output_dir: str, samples_per_s: float) -> dict[str, float]:
    """Validate the final weights; rank 0 writes metrics.json and the export and prints the figures."""
    metrics: dict[str, float] = {}
    if config.data.validation_data:
        results = trainer.validate(module, datamodule=data, verbose=False)[0]
        metrics = {k.removeprefix("val/"): round(v, 4) for k, v in results.items() if k != MONITOR}
    if trainer.is_global_zero:
        with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump({"step": trainer.global_step, **metrics}, f, indent=2)
        export_model(module.model, os.path.join(output_dir, "final"))
        print(f"\nrun: {output_dir}  steps: {trainer.global_step}  "
              f"training throughput: {samples_per_s:.0f} samples/s (validation included)")
        for name, value in metrics.items():
            print(f"  {name:32s} {value:.4f}")
        if module.skipped_nonfinite:
            steps = "step" if module.skipped_nonfinite == 1 else "steps"
            print(f"skipped {module.skipped_nonfinite} {steps} with a non-finite loss (--skip-nonfinite)")
    return metrics


def train(config: TrainConfig) -> dict[str, float]:
    """Train, validate, write metrics.json and the export; returns the final validation metrics."""
    pl.seed_everything(config.run.seed, workers=True, verbose=False)
    ckpt_path = _resume_checkpoint(config.run.resume) if config.run.resume else None
    checkpoint = None if ckpt_path is None else read_checkpoint(ckpt_path)
    output_dir, stamped = _run_folder(config, ckpt_path)
    config = replace(config, model=resolve_image_size(config.model),
                     run=replace(config.run, output_dir=output_dir,
                                 precision=resolve_precision(config.run.precision, config.run.accelerator)))

    trainer = _trainer(config, output_dir)
    if stamped and trainer.world_size > 1 and (
            trainer.num_nodes > 1 or trainer.strategy.cluster_environment.creates_processes_externally):
        raise UsageError("ranks started apart (torchrun, SLURM, several nodes) cannot agree on a time-stamped run "
                         "folder: give --output-dir or --run-name")
    optim = config.optim
    data = CaptionDataModule(config.data, config.model.image_size, config.run.seed, optim.accum_freq)
    model = _model(config, data, trainer, checkpoint, output_dir)
    data.bind(model)
    module = CLIPModule(model, optim, data.zeroshot_tasks)
    if trainer.is_global_zero:
        os.makedirs(output_dir, exist_ok=True)
        save_config(config, os.path.join(output_dir, "config.yaml"))

    first_step = checkpoint["global_step"] if checkpoint else 0
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    # the step clock may have stopped short of the end; the whole state (optimizer, loops), so that it resumes
    trainer.save_checkpoint(os.path.join(output_dir, LAST_CKPT), weights_only=False)
    samples = ((trainer.global_step - first_step) * config.data.batch_size * optim.accum_freq
               * optim.accumulate_grad_batches)
    samples_per_s = samples * trainer.world_size / (time.perf_counter() - started)
    return _report(trainer, module, data, config, output_dir, samples_per_s)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in ([c] for c in EVAL_COMMANDS) or argv[:1] in (["-h"], ["--help"]):
        from clipfromscratch.eval.cli import main as eval_main  # lazy: its plotting is not needed to train

        return eval_main(argv)  # the top-level help lists every command
    if argv[:1] == ["train-dcsm"]:
        from clipfromscratch.train_dcsm import main as train_dcsm_main

        return train_dcsm_main(argv[1:])
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
