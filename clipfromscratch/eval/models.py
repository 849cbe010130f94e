"""One interface for every evaluated model, whatever its family: ours, OpenAI CLIP (transformers), open_clip.

A model SPEC is an export directory or a Lightning `.ckpt` of ours, `openai:<hub name or local dir>`, or
`openclip:<arch>/<pretrained tag or checkpoint file>` or
`openclip:<open_clip folder>`. Adding a family is one function in ADAPTERS.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from PIL import Image
from torch.distributed.checkpoint import CheckpointException
from transformers import BatchEncoding, CLIPModel, CLIPProcessor

from clipfromscratch.dcsm import DenseScorer
from clipfromscratch.errors import UsageError, error_summary, first_line
from clipfromscratch.export import (
    HEAD_CONFIG,
    check_safetensors_in,
    load_head_beside,
    load_model,
    load_state_dict,
    model_from_checkpoint,
    read_checkpoint,
)
from clipfromscratch.formats.open_clip import import_open_clip, open_clip_name
from clipfromscratch.model import CLIP
from clipfromscratch.objectives import OBJECTIVES
from clipfromscratch.run_folder import is_checkpoint
from clipfromscratch.text_tokenizers import tokenize


@dataclass
class EvalModel:
    """Encoders return unit vectors; `preprocess` is the model's own PIL -> (3, S, S) transform."""

    name: str
    encode_image: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) -> (B, D)
    encode_text: Callable[[list[str]], torch.Tensor]  # B captions -> (B, D)
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Any
    logit_scale: float
    device: torch.device
    weights_mtime: float  # lets caches notice that the same SPEC now names retrained weights
    # dense features, where the family has them, for DCSM: (B, 3, S, S) -> (B, I, D) image tokens (the pooled
    # one first) and (B, T) ids, mask -> (B, T, D) caption tokens, unit vectors in the shared space
    encode_image_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None
    encode_text_tokens: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    dense_scorer: DenseScorer | None = None  # a trained DCSM head: the model scores pairs by it too
    logit_bias: float | None = None  # added to scale * cosine, for objectives that learn one (SigLIP)
    objective: str = "clip"  # what the model was trained with (objectives.OBJECTIVES): how scores become probabilities

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) logits (scale * cosine, plus the bias where there is one) -> class probabilities, as the model's
        objective makes them: a softmax over the classes for CLIP, each pair's own sigmoid for SigLIP."""
        return OBJECTIVES[self.objective].probabilities(logits)


def _mtime(path: str) -> float:
    return os.path.getmtime(path) if os.path.exists(path) else 0.0


def from_clip(model: CLIP, name: str, weights_mtime: float = 0.0) -> EvalModel:
    """Wrap one of our CLIP modules (also used on the live model during training)."""
    device = model.log_logit_scale.device
    return EvalModel(name, model.encode_image, model.encode_text, model.preprocess, model.tokenizer,
                     model.logit_scale().item(), device, weights_mtime, model.encode_image_tokens,
                     model.encode_text_tokens, model.dense_scorer,
                     None if model.logit_bias is None else model.logit_bias.item(), model.config.loss)


def load_checkpoint(path: str, device: torch.device) -> CLIP:
    """Our model from a Lightning checkpoint, which carries its config and tokenizer (see CLIPModule)."""
    checkpoint = read_checkpoint(path, map_location=device)
    try:
        model = model_from_checkpoint(checkpoint)
    except UsageError as err:
        raise UsageError(f"{err}: {path}") from None
    if os.path.isdir(path):
        load_sharded_weights(model, path)
        return model.to(device).eval()
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        raise UsageError(f"no weights (state_dict) in checkpoint {path}")
    load_state_dict(model, {k.removeprefix("model."): v for k, v in state_dict.items()}, path)
    return model.to(device).eval()


def load_sharded_weights(model: CLIP, path: str) -> None:
    """The weights of a sharded (FSDP) checkpoint, read whole into `model` in this one process: torch's
    distributed checkpoint re-assembles every rank's shards into the model's own tensors, no process group."""
    state = {"state_dict": {f"model.{name}": tensor for name, tensor in model.state_dict().items()}}
    try:
        with warnings.catch_warnings():  # that it reads in one process, which is the point
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=True)
    except CheckpointException as err:  # what failed, with its traceback, per rank: here the one rank, 0
        cause = next(iter(err.failures.values()))[0]
        detail = f": {first_line(cause)}" if str(cause).strip() else ""
        raise UsageError(f"cannot read the shards of checkpoint {path} (damaged or incomplete): "
                         f"{type(cause).__name__}{detail}") from None
    except (RuntimeError, OSError, KeyError) as err:
        raise UsageError(f"cannot read the shards of checkpoint {path} (damaged or incomplete): "
                         f"{first_line(err)}") from None


def load_clip(path: str, device: torch.device) -> CLIP:
    """Our model from an export directory or a Lightning checkpoint."""
    if path.endswith(".ckpt") and is_checkpoint(path):  # a file, or the folder of a sharded one
        return load_checkpoint(path, device)
    if not os.path.isdir(path):
        raise UsageError(f"unknown model '{path}': give an export directory, a .ckpt checkpoint, "
                         f"openai:<hub name or dir> or openclip:<arch>/<tag>")
    return load_model(path, device)


def load_ours(path: str, device: torch.device) -> EvalModel:
    return from_clip(load_clip(path, device), path, _mtime(path))


def load_openai(source: str, device: torch.device) -> EvalModel:
    """OpenAI CLIP (or any CLIPModel) through transformers, with the processor saved beside it."""
    check_safetensors_in(source)
    try:
        model = CLIPModel.from_pretrained(source).to(device).eval()
        processor = CLIPProcessor.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load openai:{source} (offline, or no CLIP model there?): {first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - a damaged folder fails in whichever library reads the file
        raise UsageError(f"cannot load openai:{source}: {error_summary(err)}") from None
    tokenizer, context_length = processor.tokenizer, model.config.text_config.max_position_embeddings

    # the towers' pooled outputs through the projections: the same on transformers v4 and v5
    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)

    def encode_text(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=context_length, return_tensors="pt")
        pooled = model.text_model(input_ids=tokens["input_ids"].to(device),
                                  attention_mask=tokens["attention_mask"].to(device)).pooler_output
        return F.normalize(model.text_projection(pooled), dim=-1)

    def preprocess(image: Image.Image) -> torch.Tensor:
        return processor.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    # every token as the pooled ones are made: the vision tower's post-norm (which it applies to CLS alone), then
    # the projection; the text tower's states are normed already. Token 0 of the image is then the pooled one.
    def encode_image_tokens(pixels: torch.Tensor) -> torch.Tensor:
        hidden = model.vision_model(pixel_values=pixels).last_hidden_state
        return F.normalize(model.visual_projection(model.vision_model.post_layernorm(hidden)), dim=-1)

    def encode_text_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(model.text_projection(hidden), dim=-1)

    return EvalModel(f"openai:{source}", encode_image, encode_text, preprocess, tokenizer,
                     model.logit_scale.exp().item(), device, _mtime(source), encode_image_tokens, encode_text_tokens)


def load_openclip(spec: str, device: torch.device) -> EvalModel:
    """An open_clip model: `<arch>/<pretrained tag or checkpoint file>`, or a folder open_clip loads as
    `local-dir:` (what `clipfromscratch export --format open_clip` writes)."""
    open_clip = import_open_clip()
    name, pretrained = open_clip_name(spec, "openclip:")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError) as err:
        raise UsageError(f"cannot load openclip:{spec}: {first_line(err)}") from None
    model.eval()
    return EvalModel(f"openclip:{spec}", lambda pixels: F.normalize(model.encode_image(pixels), dim=-1),
                     lambda texts: F.normalize(model.encode_text(tokenizer(texts).to(device)), dim=-1),
                     preprocess, tokenizer, model.logit_scale.exp().item(), device, _mtime(pretrained or spec),
                     # open_clip's SigLIP models are the ones with a bias
                     logit_bias=None if getattr(model, "logit_bias", None) is None else model.logit_bias.item(),
                     objective="clip" if getattr(model, "logit_bias", None) is None else "siglip")


ADAPTERS: dict[str, Callable[[str, torch.device], EvalModel]] = {"openai": load_openai, "openclip": load_openclip}


def parse_device(name: str | torch.device) -> torch.device:
    """--device as a torch.device that exists here, else a one-line UsageError."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name}: {first_line(err)}") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise UsageError(f"--device {name}: there is no {device.type} device here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def load_eval_model(spec: str, device: str | torch.device = "cpu") -> EvalModel:
    """The model a SPEC names, in eval mode on `device`; a folder `train-dcsm` wrote for an `openai:` model
    loads that model with its head."""
    family, colon, rest = spec.partition(":")
    device = parse_device(device)
    if colon and family in ADAPTERS:
        return ADAPTERS[family](rest, device)
    if os.path.isfile(os.path.join(spec, HEAD_CONFIG)):
        family, base, head = load_head_beside(spec, device)
        if family not in ADAPTERS:
            raise UsageError(f"{os.path.join(spec, HEAD_CONFIG)}: unknown model family '{family}' (known: "
                             f"{', '.join(ADAPTERS)})")
        return replace(ADAPTERS[family](base, device), name=spec, dense_scorer=head)
    return load_ours(spec, device)


class _BenchmarkModel(torch.nn.Module):
    """Our CLIP with the encode_text(tokens) signature CLIP_benchmark calls."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, tokens: BatchEncoding) -> torch.Tensor:
        return self.model.encode_tokens(tokens["input_ids"], tokens["attention_mask"])


def load_clip_benchmark(model_name: str, pretrained: str | None = None, cache_dir: str | None = None,
                        device: str | torch.device = "cpu"):
    """CLIP_benchmark's loader interface -> (model, transform, tokenizer); `model_name` is our export or .ckpt.

    Register it in CLIP_benchmark's `clip_benchmark/models/__init__.py` TYPE2FUNC; `pretrained` and
    `cache_dir` are part of that signature and unused here (the weights are in `model_name`).
    """
    clip = load_clip(model_name, torch.device(device))

    def tokenizer(texts: list[str]) -> BatchEncoding:
        return BatchEncoding(tokenize(clip.tokenizer, list(texts), clip.config.context_length))

    return _BenchmarkModel(clip).eval(), clip.preprocess, tokenizer
