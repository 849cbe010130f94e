"""What can be configured: one typed field per option, set by defaults < YAML (`--config`) < command line.

Every field is a flag (`embed_dim` -> `--embed-dim`) and a YAML key; the resolved config is saved with each run.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

import yaml

from clipfromscratch.errors import UsageError

SHORT_FLAGS = {"image_encoder": "--image-enc", "text_encoder": "--text-enc"}


def opt(default, help: str, choices: tuple | None = None):
    """A config field with its --help line (and the values it may take)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    """What the model is: everything needed to rebuild it, saved with every checkpoint and export."""

    image_encoder: str = opt("vit", "image tower: resnet | vit | xception | any timm model name")
    text_encoder: str = opt("bert", "text tower: bert | gpt2 | any Hugging Face model name or local directory")
    model_size: str = opt("tiny", "tower sizes: tiny (CPU demo, tests) or base (ResNet-50, ViT-B/16, Xception, "
                                  "BERT-base, GPT-2 small)", ("tiny", "base"))
    image_size: int | None = opt(None, "input resolution (default: the image preset's)")
    embed_dim: int = opt(256, "width of the shared embedding space")
    head: str = opt("linear", "projection head: linear (no bias, as CLIP) or mlp (GELU, dropout, residual, LayerNorm)",
                    ("linear", "mlp"))
    head_dropout: float = opt(0.1, "dropout inside the mlp head")
    pretrained_image: bool = opt(False, "load published image tower weights (needs the network or a warm cache)")
    pretrained_text: bool = opt(False, "load published text tower weights and its tokenizer")
    text_pooling: str | None = opt(None, "text pooling (default: the family's: bert cls, gpt2 last)",
                                   ("cls", "mean", "last"))
    context_length: int = opt(77, "captions are truncated to this many tokens")
    image_overrides: dict = opt(dict, "timm constructor arguments over the preset (YAML or JSON)")
    text_overrides: dict = opt(dict, "Hugging Face config fields over the preset (YAML or JSON)")


@dataclass
class TrainConfig(ModelConfig):
    """A training run: the model, its data, the optimisation and the Lightning Trainer."""

    train_data: str = opt("synthetic", "training data: synthetic | a .tsv/.csv caption table | webdataset shards "
                                       "(a .tar, a directory, or a brace pattern)")
    val_data: str | None = opt(None, "validation data, same forms (default: synthetic when training on synthetic)")
    synthetic_train_samples: int = opt(100_000, "samples in one epoch of synthetic training data")
    synthetic_val_samples: int = opt(1_000, "held-out synthetic validation samples")
    csv_img_key: str = opt("filepath", "image path column of a caption table")
    csv_caption_key: str = opt("caption", "caption column of a caption table")
    csv_separator: str = opt("\t", "column separator of a caption table")
    shuffle_buffer: int = opt(1000, "samples in the shuffle buffer of streamed training shards")
    dataset_resampled: bool = opt(False, "draw training shards at random with replacement, an endless stream cut "
                                         "into epochs of --train-num-samples (for multi-node training)")
    train_num_samples: int | None = opt(None, "samples in one training epoch of shards (needed with "
                                              "--dataset-resampled; otherwise a cap that keeps ranks in step)")
    batch_size: int = opt(64, "samples per step and device (the contrastive batch)")
    num_workers: int = opt(1, "data loader worker processes")
    lr: float = opt(5e-4, "peak learning rate of AdamW")
    weight_decay: float = opt(0.1, "AdamW weight decay on weight matrices (never on biases, norms, temperature)")
    warmup_steps: int = opt(100, "linear warm-up steps before the cosine decay")
    lr_schedule: str = opt("cosine", "cosine (warm-up then cosine), plateau (ReduceLROnPlateau on validation "
                                     "recall) or constant", ("cosine", "plateau", "constant"))
    plateau_patience: int = opt(3, "validations without improvement before plateau divides the LR")
    plateau_factor: float = opt(0.2, "factor plateau multiplies the LR by")
    early_stopping_patience: int | None = opt(None, "stop after this many validations without improvement")
    max_steps: int = opt(1000, "optimizer steps to train for (-1: no limit, use --max-epochs)")
    max_epochs: int | None = opt(None, "epochs to train for")
    val_every_n_steps: int = opt(500, "validate every this many training batches")
    precision: str = opt("32-true", "Lightning precision: 32-true (CPU default), bf16-mixed (GPUs), 16-mixed")
    accelerator: str = opt("auto", "cpu | gpu | auto")
    devices: str = opt("auto", "devices per node: a number, a list like 0,1, or auto")
    strategy: str = opt("auto", "Lightning strategy: auto | ddp | ...")
    num_nodes: int = opt(1, "machines in the job")
    gradient_clip_val: float | None = opt(1.0, "clip the gradient norm to this value (none: no clipping)")
    accumulate_grad_batches: int = opt(1, "batches per optimizer step (adds no negatives to the loss)")
    accum_freq: int = opt(1, "feature-cached accumulation: K micro-batches of --batch-size per step, all K x B "
                             "samples negatives of each other, activation memory of one micro-batch")
    grad_checkpointing: bool = opt(False, "recompute tower activations in backward: less memory, ~30% more compute")
    lock_image: bool = opt(False, "freeze the image tower, norm statistics included (LiT); its head still trains")
    lock_text: bool = opt(False, "freeze the text tower (LiT); its head still trains")
    skip_nonfinite: bool = opt(False, "skip (and count) steps whose loss is NaN or inf instead of stopping the run")
    checkpoint_every_n_steps: int = opt(100, "write last.ckpt every this many steps, so a killed run loses little")
    log_every_n_steps: int = opt(10, "training steps between logged rows")
    seed: int = opt(0, "random seed for weights, data order and synthetic data")
    output_dir: str | None = opt(None, "where checkpoints, logs and the export go (default: checkpoints/<run-name>)")
    run_name: str | None = opt(None, "run name (default: <image>-<text>-<date>-<time>)")
    resume: str | None = opt(None, "continue a run: its directory or a checkpoint file (default last.ckpt)")
    logger: str = opt("csv", "metrics logger", ("csv", "tensorboard", "wandb"))
    zeroshot_data: str | None = opt(None, "labelled data to classify zero-shot at validations, logged as "
                                          "val/zeroshot_<name>_acc1 (as `eval --data`: imagefolder:DIR, "
                                          "cifar10:ROOT, shards with a --zeroshot-label field)")
    zeroshot_label: str | None = opt(None, "the class field of --zeroshot-data (shards: a KEY.json key)")
    zeroshot_templates: str | None = opt(None, "prompt templates: simple | openai_imagenet | cifar | FILE")
    zeroshot_every_n_validations: int = opt(1, "run --zeroshot-data at every N-th validation")

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})


def _base_type(annotation: str) -> type:
    """'int | None' -> int (dataclass annotations are strings under `from __future__ import annotations`)."""
    hint = typing.get_type_hints(TrainConfig)[annotation]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(name: str, value):
    """Check and convert one value to its field's type; None is allowed where the default is None."""
    spec = next(f for f in fields(TrainConfig) if f.name == name)
    kind = _base_type(name)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and spec.default is None):
        if spec.default is not None:
            raise UsageError(f"option {name} cannot be empty")
        return None
    try:
        if kind is bool:
            if isinstance(value, str):
                value = {"true": True, "false": False}[value.lower()]
            if not isinstance(value, bool):
                raise ValueError
        elif kind is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
        elif kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = int(value)
        else:
            value = kind(value)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise UsageError(f"option {name} expects {kind.__name__}, got {value!r}") from None
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        raise UsageError(f"option {name} is '{value}': choose one of {', '.join(choices)}")
    return value


def read_yaml(path: str) -> dict:
    """The options of a YAML recipe, checked against the known names."""
    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    known = [f.name for f in fields(TrainConfig)]
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            raise UsageError(f"unknown option '{key}' in {path}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipfromscratch train", description="Train a CLIP model from scratch.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML recipe; flags given here win over it")
    for spec in fields(TrainConfig):
        flags = [f"--{spec.name.replace('_', '-')}"]
        if spec.name in SHORT_FLAGS:
            flags.insert(0, SHORT_FLAGS[spec.name])
        default = spec.default_factory() if spec.default is MISSING else spec.default
        help_text = spec.metadata["help"] + f" (default: {default!r})"
        if _base_type(spec.name) is bool:
            parser.add_argument(*flags, dest=spec.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(*flags, dest=spec.name, metavar=spec.name.upper(), help=help_text)
    return parser


def load_config(argv: list[str]) -> TrainConfig:
    """Defaults, then the YAML of --config (or of the resumed run), then the flags."""
    args = vars(build_parser().parse_args(argv))
    values: dict = {}
    resume = args.get("resume")
    if resume:
        run_dir = resume if os.path.isdir(resume) else os.path.dirname(resume)
        if os.path.isfile(os.path.join(run_dir, "config.yaml")):
            values.update(read_yaml(os.path.join(run_dir, "config.yaml")))
    if "config" in args:
        values.update(read_yaml(args.pop("config")))
    values.update(args)
    return TrainConfig(**{name: _coerce(name, value) for name, value in values.items()})


def save_config(config: TrainConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(asdict(config), f, sort_keys=False)
