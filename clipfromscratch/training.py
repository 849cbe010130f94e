"""The `train` command (`python train.py ...`, `clipfromscratch train ...`): flags and YAML -> data, model,
Trainer -> a trained run.

`train` goes through the steps of a run in order: the run folder, the Trainer (which knows this process's rank
before any process group exists), the data, the model with a tokenizer shared by every rank, fitting, and the
report (metrics.json, the export).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import replace

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.exceptions import SIGTERMException
from transformers.utils import logging as transformers_logging

from clipfromscratch import run_folder
from clipfromscratch.config import TrainConfig, load_config, save_config
from clipfromscratch.data.datamodule import CaptionDataModule
from clipfromscratch.errors import UsageError, first_line, report
from clipfromscratch.export import export_model, model_from_checkpoint, read_checkpoint
from clipfromscratch.formats.published import architecture, published_model
from clipfromscratch.lit_module import MONITOR, CLIPModule
from clipfromscratch.model import CLIP, build_model, resolve_image_size
from clipfromscratch.outputs import write_text_atomic
from clipfromscratch.run_folder import LAST_CKPT
from clipfromscratch.text_tokenizers import make_tokenizer, shared_tokenizer
from clipfromscratch.trainer import build_trainer, resolve_precision

RUN_TOKENIZER = "tokenizer"  # the run folder's tokenizer, written by rank 0 and read by every rank
SIGTERM_EXIT = 143  # 128 + SIGTERM: the run did not finish, schedulers and torchrun should not take it for done


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


def _model(config: TrainConfig, data: CaptionDataModule, trainer: pl.Trainer, checkpoint: dict | None,
           output_dir: str) -> CLIP:
    """The resumed architecture, the published model of --init, or a new model whose tokenizer rank 0 makes once
    for every rank."""
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint)
    elif config.model.init:
        model = published_model(config.model)
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
    whole = module.whole_model()  # under FSDP, every rank hands rank 0 its shards
    if trainer.is_global_zero:
        write_text_atomic(os.path.join(output_dir, "metrics.json"),
                          json.dumps({"step": trainer.global_step, **metrics}, indent=2))
        export_model(whole, os.path.join(output_dir, "final"))
        print(f"\nrun: {output_dir}  steps: {trainer.global_step}  "
              f"training throughput: {samples_per_s:.0f} samples/s (validation included)")
        for name, value in metrics.items():
            print(f"  {name:32s} {value:.4f}")
        if skipped := module.skipped_nonfinite:
            print(f"skipped {skipped} {'step' if skipped == 1 else 'steps'} with a non-finite loss (--skip-nonfinite)")
    return metrics


class RanksLost(Exception):
    """A collective failed: another rank died, or did not answer within --ddp-timeout-s."""


def _in_collective(err: BaseException) -> bool:
    """Whether `err` is a collective's failure: gloo and NCCL raise plain RuntimeErrors, from torch.distributed
    or from DDP's own collectives (buffer broadcasts, gradient reduction)."""
    where = (os.path.join("torch", "distributed", ""), os.path.join("torch", "nn", "parallel", "distributed.py"))
    return (isinstance(err, dist.DistError) or re.search(r"gloo|nccl|c10d", str(err), re.IGNORECASE) is not None
            or any(place in frame.filename for frame in traceback.extract_tb(err.__traceback__) for place in where))


def _collective_reason(err: BaseException) -> str:
    # "[/path/to/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:13958: Connection reset by peer. ..."
    return re.sub(r"^\[[^\]]*\] ", "", first_line(err, None)).split(". ")[0][:160]


def _warn_short_warmup(config: TrainConfig) -> None:
    optim, steps = config.optim, config.run.max_steps
    if optim.lr_schedule == "cosine" and 0 < steps < optim.warmup_steps:
        print(f"warning: --max-steps {steps} ends inside the {optim.warmup_steps}-step warm-up: the learning rate "
              f"peaks at {optim.lr * steps / optim.warmup_steps:.3g}, never at --lr {optim.lr:g}", file=sys.stderr,
              flush=True)


def train(config: TrainConfig) -> dict[str, float]:
    """Train, validate, write metrics.json and the export; returns the final validation metrics."""
    pl.seed_everything(config.run.seed, workers=True, verbose=False)
    output_dir, ckpt_path, stamped = run_folder.plan(config.run.output_dir, config.run.run_name, config.run.resume,
                                                     f"{config.model.image_encoder}-{config.model.text_encoder}")
    checkpoint = None if ckpt_path is None else read_checkpoint(ckpt_path)
    if config.model.init and checkpoint is None:  # a resumed run's config.yaml holds the architecture already
        config = replace(config, model=architecture(config.model))
    config = replace(config, model=resolve_image_size(config.model),
                     run=replace(config.run, output_dir=output_dir,
                                 precision=resolve_precision(config.run.precision, config.run.accelerator)))

    trainer = build_trainer(config, output_dir)
    if stamped and trainer.world_size > 1 and (
            trainer.num_nodes > 1 or trainer.strategy.cluster_environment.creates_processes_externally):
        raise UsageError("ranks started apart (torchrun, SLURM, several nodes) cannot agree on a time-stamped run "
                         "folder: give --output-dir or --run-name")
    with run_folder.claim(output_dir, resuming=ckpt_path is not None, rank=trainer.global_rank):
        optim = config.optim
        data = CaptionDataModule(config.data, config.model.image_size, config.run.seed, optim.accum_freq)
        data.check_training_data(trainer.world_size)
        model = _model(config, data, trainer, checkpoint, output_dir)
        data.bind(model)
        module = CLIPModule(model, optim, data.zeroshot_tasks, data.batch_size)
        if trainer.is_global_zero:
            save_config(config, os.path.join(output_dir, "config.yaml"))
            _warn_short_warmup(config)

        first_step = checkpoint["global_step"] if checkpoint else 0
        started = time.perf_counter()
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
            # the step clock may have stopped short of the end; the whole state (optimizer, loops), to resume from
            trainer.save_checkpoint(os.path.join(output_dir, LAST_CKPT), weights_only=False)
            samples = ((trainer.global_step - first_step) * config.data.batch_size * optim.accum_freq
                       * optim.accumulate_grad_batches)
            samples_per_s = samples * trainer.world_size / (time.perf_counter() - started)
            return _report(trainer, module, data, config, output_dir, samples_per_s)
        except RuntimeError as err:
            if not _in_collective(err):
                raise
            raise RanksLost(f"rank {trainer.global_rank} lost the other ranks ({_collective_reason(err)}): one of "
                            f"them died or hung (out of memory? a lost node? its own log says); continue with "
                            f"--resume {output_dir}") from None


def main(argv: list[str]) -> int:
    """Train as the flags (and --config's YAML) say; the exit code."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    # advice that does not apply here: few workers on small CPUs, FLOP counting, a Lightning-internal deprecation
    for noise in (".*does not have many workers.*", ".*flops_per_batch.*", ".*LeafSpec.*",
                  # the run folder holds our own files (config, tokenizer, lock) before its first checkpoint, and
                  # one holding checkpoints is refused unless resumed (run_folder.plan)
                  "Checkpoint directory .* exists and is not empty",
                  # validation metrics come from every rank's gathered features: each rank logs the same global
                  # value, and the duplicates a DistributedSampler pads with are dropped by index (exactly once)
                  ".*sync_dist=True.*", ".*Using `DistributedSampler` with the dataloaders.*",
                  # streamed shards give every rank and worker an exact share (data/shards.py): the length holds
                  ".*`IterableDataset` has `__len__` defined.*",
                  # --strategy fsdp: a tower's output is a view (a pooled CLS token, taken by indexing); FSDP2 warns
                  # of in-place ops on it, and the heads read it without changing it
                  ".*FSDP2-wrapped module .* returned a view tensor.*"):
        warnings.filterwarnings("ignore", noise)
    transformers_logging.disable_progress_bar()  # bars for reading published weights from disk (--init)
    with _process_left_as_found():
        try:
            train(load_config(argv))
        except UsageError as err:
            return report(err)
        except RanksLost as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        except FloatingPointError as err:
            print(f"error: {err}: lower --lr or set --gradient-clip-val", file=sys.stderr)
            return 1
        except SIGTERMException:
            return SIGTERM_EXIT
    return 0


@contextlib.contextmanager
def _process_left_as_found():
    """A caller that goes on in this process (a notebook, a test, gpu_check) gets it back as it was. Lightning
    writes the launch into os.environ (LOCAL_RANK, NODE_RANK, MASTER_ADDR, MASTER_PORT): left there, a multi-rank
    run started next, even in a child process, takes itself for an already launched rank and waits for peers
    that never come. And --strategy fsdp leaves its process group standing, its store listening on that port."""
    environment = dict(os.environ)
    group_was_ours = not (dist.is_available() and dist.is_initialized())
    try:
        yield
    finally:
        if group_was_ours and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
