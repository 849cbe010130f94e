"""What can be configured: one typed field per option, set by defaults < YAML (`--config`) < command line.

The options come in sections, each read by the part of the code it configures: `model` (rebuilds the model,
saved with every checkpoint and export), `data` (the DataModule), `optim` (the LightningModule) and `run` (the
Trainer and the run folder). Every field is a flag (`embed_dim` -> `--embed-dim`) and a flat YAML key, and its
value is checked here, once, against its type, its choices and its range; the help text says what is accepted.
The resolved config is saved with each run. Evaluation's options (`EvalOptions`) are a section of the same kind:
`options_of`, `add_flags` and `section_from` make and check the flags of any such sections.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import math
import os
import types
import typing
from collections.abc import Collection, Iterable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields

import yaml

from clipfromscratch.errors import CommandLineParser, UsageError, first_line
from clipfromscratch.objectives import OBJECTIVES

SHORT_FLAGS = {"image_encoder": "--image-enc", "text_encoder": "--text-enc"}
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
TENSORBOARD_MODULES = ("tensorboard", "tensorboardX")  # what Lightning's TensorBoardLogger writes with


def opt(default, help: str, choices: Collection[str] | None = None, at_least: float | None = None,
        above: float | None = None, below: float | None = None, at_most: float | None = None):
    """A config field with its --help line, and the values it accepts: `choices`, or a range whose bounds are
    inclusive (`at_least`, `at_most`) or exclusive (`above`, `below`)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    bounds = {"at least": at_least, "above": above, "below": below, "at most": at_most}
    return field(**factory, metadata={"help": help, "choices": choices,
                                      "bounds": {k: v for k, v in bounds.items() if v is not None}})


def parse_devices(devices: str) -> str | int | list[int]:
    """--devices: 'auto', a count ('2'; -1: all), or a list of device indices ('0,1')."""
    if devices == "auto":
        return devices
    try:
        parsed = [int(d) for d in devices.split(",") if d] if "," in devices else int(devices)
    except ValueError:
        raise UsageError(f"option devices is '{devices}': give a number, a list like 0,1, or auto") from None
    if (isinstance(parsed, int) and (parsed == 0 or parsed < -1)) or (isinstance(parsed, list) and min(parsed) < 0):
        raise UsageError(f"option devices is '{devices}': give at least one device (-1: all of them)")
    return parsed


@dataclass
class ModelConfig:
    """What the model is: everything needed to rebuild it, saved with every checkpoint and export."""

    image_encoder: str = opt("vit", "image tower: resnet | vit | xception | clip_vision (transformers' CLIP ViT) | "
                                    "any timm model name")
    text_encoder: str = opt("bert", "text tower: bert | gpt2 | clip_text (CLIP's text transformer) | any Hugging "
                                    "Face model name or local directory")
    model_size: str = opt("tiny", "tower sizes: tiny (CPU demo, tests) or base (ResNet-50, ViT-B/16, Xception, "
                                  "BERT-base, GPT-2 small)", ("tiny", "base"))
    image_size: int | None = opt(None, "input resolution in pixels (default: the image preset's)", at_least=1)
    embed_dim: int = opt(256, "width of the shared embedding space", at_least=1)
    head: str = opt("linear", "projection head: linear (no bias, as CLIP) or mlp (GELU, dropout, residual, LayerNorm)",
                    ("linear", "mlp"))
    head_dropout: float = opt(0.1, "dropout inside the mlp head", at_least=0, below=1)
    loss: str = opt("clip", "contrastive loss: clip (softmax InfoNCE, temperature from 0.07), siglip (pairwise "
                            "sigmoid with a learned bias, scale from 10 and bias from -10, as SigLIP), or any "
                            "registered objective", OBJECTIVES)
    patch_dropout: float = opt(0.0, "share of a ViT's patch tokens dropped at random in training, never in "
                                    "evaluation (FLIP; timm's patch_drop_rate)", at_least=0, below=1)
    pretrained_image: bool = opt(False, "load published image tower weights (needs the network or a warm cache)")
    pretrained_text: bool = opt(False, "load published text tower weights and its tokenizer")
    text_pooling: str | None = opt(None, "text pooling (default: the family's: bert cls, gpt2 last)",
                                   ("cls", "mean", "last"))
    context_length: int = opt(77, "captions are truncated to this many tokens (at most the text tower's positions)",
                              at_least=2)
    image_overrides: dict = opt(dict, "timm constructor arguments over the preset (clip_vision: config fields, and "
                                      "image_mean, image_std) (YAML or JSON)")
    text_overrides: dict = opt(dict, "Hugging Face config fields over the preset (YAML or JSON)")
    init: str | None = opt(None, "start from a published CLIP's towers, heads, temperature and tokenizer (it sets "
                                 "the encoders, sizes, head, embed_dim and image size): openai:<transformers CLIP "
                                 "folder or hub name>, openclip:<arch>/<tag>, or openclip:<open_clip folder>")


@dataclass
class DataConfig:
    """Where samples come from and how they are batched: read by the DataModule and the zero-shot callback."""

    train_data: str = opt("synthetic", "training data: synthetic | a .tsv/.csv caption table | webdataset shards "
                                       "(a .tar, a directory, or a brace pattern)")
    val_data: str | None = opt(None, "validation data, same forms (default: synthetic when training on synthetic)")
    synthetic_train_samples: int = opt(100_000, "samples in one epoch of synthetic training data", at_least=1)
    synthetic_val_samples: int = opt(1_000, "held-out synthetic validation samples", at_least=1)
    csv_img_key: str = opt("filepath", "image path column of a caption table")
    csv_caption_key: str = opt("caption", "caption column of a caption table")
    csv_separator: str | None = opt(None, "column separator of a caption table, one character (default: by its "
                                          "suffix, a comma for .csv and a tab otherwise)")
    shuffle_buffer: int = opt(1000, "samples in the shuffle buffer of streamed training shards", at_least=1)
    dataset_resampled: bool = opt(False, "draw training shards at random with replacement, an endless stream cut "
                                         "into epochs of --train-num-samples (for multi-node training)")
    train_num_samples: int | None = opt(None, "samples in one training epoch of shards (needed with "
                                              "--dataset-resampled; otherwise a cap that keeps ranks in step)",
                                        at_least=1)
    batch_size: int = opt(64, "samples per step and device (the contrastive batch; with --accum-freq K, "
                              "each of the K micro-batches)", at_least=1)
    num_workers: int = opt(1, "data loader worker processes", at_least=0)
    zeroshot_data: str | None = opt(None, "labelled data to classify zero-shot at validations, logged as "
                                          "val/zeroshot_<name>_acc1 (as `eval --data`: imagefolder:DIR, "
                                          "cifar10:ROOT, shards with a --zeroshot-label field)")
    zeroshot_label: str | None = opt(None, "the class field of --zeroshot-data (shards: a KEY.json key)")
    zeroshot_templates: str | None = opt(None, "prompt templates: simple | openai_imagenet | cifar | FILE")
    zeroshot_every_n_validations: int = opt(1, "run --zeroshot-data at every N-th validation", at_least=1)

    @property
    def validation_data(self) -> str | None:
        """What validation reads: --val-data, or held-out synthetic samples when training on synthetic data."""
        return self.val_data or ("synthetic" if self.train_data == "synthetic" else None)


@dataclass
class OptimConfig:
    """How the model is optimised: read by the LightningModule (and the Trainer's clipping and accumulation)."""

    lr: float = opt(5e-4, "peak learning rate of AdamW", above=0)
    weight_decay: float = opt(0.1, "AdamW weight decay on weight matrices (never on biases, norms, temperature)",
                              at_least=0)
    warmup_steps: int = opt(100, "linear warm-up steps before the cosine decay", at_least=0)
    lr_schedule: str = opt("cosine", "cosine (warm-up then cosine), plateau (ReduceLROnPlateau on validation "
                                     "recall) or constant", ("cosine", "plateau", "constant"))
    plateau_patience: int = opt(3, "validations without improvement before plateau divides the LR", at_least=0)
    plateau_factor: float = opt(0.2, "factor plateau multiplies the LR by", above=0, below=1)
    gradient_clip_val: float | None = opt(1.0, "clip the gradient norm to this value (none: no clipping)", above=0)
    accumulate_grad_batches: int = opt(1, "batches per optimizer step (adds no negatives to the loss)", at_least=1)
    accum_freq: int = opt(1, "feature-cached accumulation: K micro-batches of --batch-size per step, all K x B "
                             "samples negatives of each other, activation memory of one micro-batch", at_least=1)
    grad_checkpointing: bool = opt(False, "recompute tower activations in backward: less memory, more compute")
    lock_image: bool = opt(False, "freeze the image tower, norm statistics included (LiT); its head still trains")
    lock_text: bool = opt(False, "freeze the text tower (LiT); its head still trains")
    lock_image_unlocked_groups: int = opt(0, "with --lock-image: the last N layer groups of the image tower (timm's "
                                             "groups: stem, each block or stage, final norm) still train", at_least=0)
    lock_text_unlocked_layers: int = opt(0, "with --lock-text: the last N transformer layers of the text tower (and "
                                            "its final norm) still train", at_least=0)
    layer_decay: float = opt(1.0, "layer-wise lr decay: each tower layer group's lr is the lr times this to the "
                                  "power of its depth from the top (for pretrained towers; 1: off)", above=0,
                             at_most=1)
    ema_decay: float | None = opt(None, "keep an exponential moving average of the weights with this decay per "
                                        "step; validation, checkpoints and the export use it", above=0, below=1)
    skip_nonfinite: bool = opt(False, "skip (and count) steps whose loss is NaN or inf instead of stopping the run")


@dataclass
class RunConfig:
    """How long, where and on what the run goes: read by the Trainer, its callbacks and the run folder."""

    max_steps: int = opt(1000, "optimizer steps to train for (-1: no limit, use --max-epochs)", at_least=-1)
    max_epochs: int | None = opt(None, "epochs to train for", at_least=1)
    val_every_n_steps: int = opt(500, "validate every this many optimizer steps (as --max-steps counts them)",
                                 at_least=1)
    early_stopping_patience: int | None = opt(None, "stop after this many validations without improvement",
                                              at_least=1)
    precision: str = opt("auto", "auto (bf16-mixed on GPUs with bf16, 16-mixed on older GPUs, 32-true on CPUs), "
                                 "32-true, bf16-mixed or 16-mixed", PRECISIONS)
    accelerator: str = opt("auto", "what to run on (auto: a GPU if there is one)",
                           ("auto", "cpu", "gpu", "cuda", "mps"))
    devices: str = opt("auto", "devices per node: a number (-1: all GPUs, or one process per CPU core), a list of "
                               "GPUs like 0,1, or auto (every GPU, or one CPU process)")
    strategy: str = opt("auto", "auto (one device: none; several: ddp), ddp, or fsdp (parameters, gradients and "
                                "optimizer state sharded over all ranks: FSDP2, through Lightning's "
                                "ModelParallelStrategy)", ("auto", "ddp", "fsdp"))
    num_nodes: int = opt(1, "machines in the job", at_least=1)
    ddp_timeout_s: int = opt(600, "several ranks: seconds a rank waits for the others in a collective before the "
                                  "run stops (a dead or stuck rank ends the job instead of hanging it)", at_least=1)
    checkpoint_every_n_steps: int = opt(100, "write last.ckpt every this many steps, so a killed run loses little",
                                        at_least=1)
    log_every_n_steps: int = opt(10, "training steps between logged rows", at_least=1)
    progress_every_n_steps: int = opt(50, "when output goes to a file (SLURM .out, nohup), print a progress line "
                                          "every this many steps (a terminal shows a progress bar)", at_least=1)
    compile: bool = opt(False, "torch.compile the towers (falls back to eager, with one line, where the platform "
                               "cannot compile)")
    seed: int = opt(0, "random seed for weights, data order and synthetic data", at_least=0, at_most=2**32 - 1)
    deterministic: bool = opt(False, "deterministic GPU kernels where torch has them (slower): the same seed then "
                                     "gives the same run on GPUs too; CPU runs are reproducible without it")
    output_dir: str | None = opt(None, "where checkpoints, logs and the export go (default: checkpoints/<run-name>)")
    run_name: str | None = opt(None, "run name (default: <image>-<text>-<date>-<time>)")
    resume: str | None = opt(None, "continue a run: its directory or a checkpoint file (default last.ckpt)")
    logger: str = opt("csv", "metrics logger (tensorboard: pip install 'clipfromscratch[tensorboard]')",
                      ("csv", "tensorboard", "wandb"))


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig}


@dataclass
class TrainConfig:
    """A training run: one section per part of the code that reads it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_flat(cls, values: dict) -> TrainConfig:
        """Flat {option: value} (YAML keys, flags) -> sections; every value checked by `_coerce`."""
        return cls(**{name: section_from(section, values) for name, section in SECTIONS.items()})

    def flat(self) -> dict:
        """{option: value} as YAML recipes and flags name them."""
        return {k: v for section in asdict(self).values() for k, v in section.items()}

    def check(self) -> None:
        """The rules that tie options together."""
        has_val = self.data.validation_data is not None
        if not has_val and (self.optim.lr_schedule == "plateau" or self.run.early_stopping_patience is not None):
            raise UsageError("lr_schedule plateau and early stopping watch validation recall: give --val-data")
        if not has_val and self.data.zeroshot_data:
            raise UsageError("--zeroshot-data runs at validations: give --val-data")
        if self.run.max_steps == -1 and self.run.max_epochs is None:
            raise UsageError("set --max-steps or --max-epochs, or training never ends")
        if self.run.max_steps == 0:
            raise UsageError("option max_steps is 0: a run trains at least 1 step (-1: as many as --max-epochs take)")
        if self.run.logger == "tensorboard" and not any(importlib.util.find_spec(m) for m in TENSORBOARD_MODULES):
            raise UsageError("--logger tensorboard needs the tensorboard package: pip install "
                             "'clipfromscratch[tensorboard]' (or use --logger csv or wandb)")
        if self.run.strategy == "fsdp" and self.optim.ema_decay is not None:
            raise UsageError("--ema-decay with --strategy fsdp: the average would keep whole weights on every rank, "
                             "which sharding is there to avoid (FSDP cannot copy its sharded model either)")
        if self.data.dataset_resampled and self.data.train_num_samples is None:
            raise UsageError("--dataset-resampled needs --train-num-samples (the samples in one epoch)")
        parse_devices(self.run.devices)
        optim = self.optim
        for unlocked, locked, flag, lock in (
                (optim.lock_image_unlocked_groups, optim.lock_image, "--lock-image-unlocked-groups", "--lock-image"),
                (optim.lock_text_unlocked_layers, optim.lock_text, "--lock-text-unlocked-layers", "--lock-text")):
            if unlocked and not locked:
                raise UsageError(f"{flag} applies to a locked tower: add {lock}")


def options_of(sections: Iterable[type]) -> dict[str, tuple[Field, type]]:
    """{option: (its field, its section)} of dataclass sections whose fields are made with `opt`."""
    return {f.name: (f, section) for section in sections for f in fields(section)}


OPTIONS = options_of(SECTIONS.values())


def _base_type(spec: Field, section: type) -> tuple[type, bool]:
    """'int | None' -> (int, True): the field's type and whether `none` is a value it takes."""
    # annotations are strings under `from __future__ import annotations`
    hint = typing.get_type_hints(section)[spec.name]
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return hint, False


def _check_range(name: str, value, bounds: dict) -> None:
    tests = {"at least": lambda b: value >= b, "above": lambda b: value > b,
             "below": lambda b: value < b, "at most": lambda b: value <= b}
    if isinstance(value, float) and not math.isfinite(value) or not all(tests[k](b) for k, b in bounds.items()):
        raise UsageError(f"option {name} is {value}: it must be {_range_words(bounds)}")


def _range_words(bounds: dict) -> str:
    return " and ".join(f"{k} {v if isinstance(v, int) else format(v, 'g')}" for k, v in bounds.items())


def _coerce(spec: Field, section: type, value):
    """Check and convert one value to its field's type, choices and range; `none` where the type allows None."""
    name = spec.name
    kind, optional = _base_type(spec, section)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if not optional:
            raise UsageError(f"option {name} cannot be empty")
        return None
    given = value
    try:
        if kind is bool:
            if isinstance(value, str):
                value = {"true": True, "false": False}[value.lower()]
            if not isinstance(value, bool):
                raise ValueError
        elif kind is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError
        elif kind is int:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        else:
            value = kind(value)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        expected = "a mapping of names to values" if kind is dict else kind.__name__
        raise UsageError(f"option {name} expects {expected}, got {given!r}") from None
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        raise UsageError(f"option {name} is '{value}': choose one of {', '.join(choices)}")
    _check_range(name, value, spec.metadata["bounds"])
    return value


def section_from(section: type, values: dict):
    """`section` from {option: value}: the values of its fields checked by `_coerce`, its defaults for the rest."""
    return section(**{f.name: _coerce(f, section, values[f.name]) for f in fields(section) if f.name in values})


def read_yaml(path: str) -> dict:
    """The options of a YAML recipe, checked against the known names."""
    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"config file {path} is not valid YAML: {first_line(err)}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    for key in values:
        if key not in OPTIONS:
            hint = difflib.get_close_matches(str(key), list(OPTIONS), n=1)
            raise UsageError(f"unknown option '{key}' in {path}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    return values


def _help(spec) -> str:
    default = spec.default_factory() if spec.default is MISSING else spec.default
    bounds = spec.metadata["bounds"]
    accepted = f"{_range_words(bounds)}; " if bounds else ""
    # argparse formats help with %: a literal one must be doubled
    return (spec.metadata["help"] + f" ({accepted}default: {default!r})").replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="clipfromscratch train", description="Train a CLIP model from scratch.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML recipe; flags given here win over it")
    add_flags(parser, OPTIONS, SHORT_FLAGS)
    return parser


def add_flags(parser: argparse.ArgumentParser, options: dict[str, tuple[Field, type]],
              short_flags: dict[str, str] | None = None) -> None:
    """One flag per option of `options_of(...)`, its value left as text for `section_from` to check; a flag not
    given is absent from the parsed arguments, so that the default (or a recipe's value) stands."""
    for name, (spec, section) in options.items():
        flags = [f"--{name.replace('_', '-')}"]
        if short_flags and name in short_flags:
            flags.insert(0, short_flags[name])
        common = {"dest": name, "default": argparse.SUPPRESS, "help": _help(spec)}
        if _base_type(spec, section)[0] is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        else:
            choices = spec.metadata["choices"]
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            parser.add_argument(*flags, metavar=metavar, **common)


def load_config(argv: list[str]) -> TrainConfig:
    """Defaults, then the YAML of --config (or of the resumed run), then the flags; checked."""
    args = vars(build_parser().parse_args(argv))
    values: dict = {}
    resume = args.get("resume")
    if resume:
        run_dir = resume if os.path.isdir(resume) else os.path.dirname(resume)
        if os.path.isfile(os.path.join(run_dir, "config.yaml")):
            values.update(read_yaml(os.path.join(run_dir, "config.yaml")))
            values.pop("output_dir", None)  # the run goes on where its checkpoint is, even if the folder has moved
    if "config" in args:
        values.update(read_yaml(args.pop("config")))
    values.update(args)
    config = TrainConfig.from_flat(values)
    config.check()
    return config


def save_config(config: TrainConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config.flat(), f, sort_keys=False)
