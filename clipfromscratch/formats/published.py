"""`--init`: a published CLIP as our CLIP, towers, heads, temperature and tokenizer, before any training.

- `openai:<folder or hub name>`: a transformers `CLIPModel` (OpenAI's, or one saved with `save_pretrained`):
  its vision and text transformers become `clip_vision` and `clip_text` towers, its projections linear heads.
- `openclip:<arch>/<tag>`, `openclip:<folder>`: open_clip's own ViT and text transformer (ViT-B-32 and the like)
  are converted to a transformers CLIPModel (formats/native_clip.py) and taken as above; a timm image tower and a
  Hugging Face text tower (what `clipfromscratch export --format open_clip` writes) become the same timm and
  transformers towers. Other towers are refused in one line.

`architecture` gives the model's shape and image size, which every rank needs before its data (from configs, no
weights read; open_clip's configs live in its code, so its model is built without them); `published_model` builds
our model and copies the weights in. A resumed run reads neither: its config.yaml and checkpoint hold all of it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from clipfromscratch.config import ModelConfig
from clipfromscratch.errors import UsageError, error_summary, first_line
from clipfromscratch.export import check_safetensors_in
from clipfromscratch.formats import native_clip
from clipfromscratch.formats.open_clip import import_open_clip, open_clip_name
from clipfromscratch.model import CLIP, build_model
from clipfromscratch.text_tokenizers import load_tokenizer

# config fields that say where a config came from, not what the model is
PROVENANCE_KEYS = ("transformers_version", "model_type", "_name_or_path", "architectures", "dtype", "torch_dtype")


def _family_and_source(spec: str) -> tuple[str, str]:
    family, colon, source = spec.partition(":")
    if not colon or family not in ("openai", "openclip") or not source:
        raise UsageError(f"--init {spec}: write openai:<transformers CLIP folder or hub name>, openclip:<arch>/<tag> "
                         f"or openclip:<open_clip folder>")
    return family, os.path.expanduser(source)


def _fields(config) -> dict:
    return {k: v for k, v in config.to_diff_dict().items() if k not in PROVENANCE_KEYS}


def _openai_config(source: str) -> CLIPConfig:
    if source.startswith((".", "/", "~")) and not os.path.isdir(source):
        raise UsageError(f"--init openai:{source}: folder not found")
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        # transformers would take the folder for a default CLIP and go on
        raise UsageError(f"--init openai:{source}: no config.json there, so no transformers CLIP model")
    try:
        return CLIPConfig.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - a missing, damaged or foreign config, in transformers' words
        raise UsageError(f"--init openai:{source}: no transformers CLIP model there (offline, or not a CLIP "
                         f"folder?): {first_line(err)}") from None


def _openai_architecture(config: ModelConfig, source: str) -> ModelConfig:
    clip_config = _openai_config(source)
    try:
        processor = CLIPImageProcessor.from_pretrained(source)
        mean, std = processor.image_mean, processor.image_std
    except OSError:  # no preprocessor_config.json: OpenAI's normalisation
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    return _clip_architecture(config, clip_config, mean, std, config.context_length)


def _clip_architecture(config: ModelConfig, clip_config: CLIPConfig, mean, std, context_length: int) -> ModelConfig:
    """`config` with the towers, heads and image size of a transformers CLIP model."""
    vision = dict(_fields(clip_config.vision_config), image_mean=list(mean), image_std=list(std))
    return replace(config, image_encoder="clip_vision", text_encoder="clip_text", model_size="base",
                   image_size=clip_config.vision_config.image_size, embed_dim=clip_config.projection_dim,
                   head="linear", text_pooling="last", image_overrides=vision,
                   context_length=min(context_length, clip_config.text_config.max_position_embeddings),
                   text_overrides=_fields(clip_config.text_config), pretrained_image=False, pretrained_text=False)


def _openai_model(config: ModelConfig, source: str) -> CLIP:
    check_safetensors_in(source)
    try:
        published = CLIPModel.from_pretrained(source)
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"--init openai:{source}: {error_summary(err)}") from None
    return _from_transformers_clip(config, published, load_tokenizer(source))


def _from_transformers_clip(config: ModelConfig, published: CLIPModel, tokenizer) -> CLIP:
    model = build_model(config, tokenizer, published.config.text_config)
    # transformers v4 nests the transformer one level deeper (CLIPVisionModel.vision_model) than v5
    for ours, theirs in ((model.image_tower.backbone, published.vision_model),
                         (model.text_tower.backbone, published.text_model)):
        getattr(ours, "vision_model", getattr(ours, "text_model", ours)).load_state_dict(
            getattr(theirs, "vision_model", getattr(theirs, "text_model", theirs)).state_dict())
    model.image_head.load_state_dict(published.visual_projection.state_dict())
    model.text_head.load_state_dict(published.text_projection.state_dict())
    with torch.no_grad():
        model.log_logit_scale.copy_(published.logit_scale)
    return model


def _load_open_clip(source: str, weights: bool):
    """The open_clip model and tokenizer `source` names; without `weights`, its architecture alone (the file is
    neither read nor loaded, but a tag's preprocessing, which the model carries, is still the tag's)."""
    open_clip = import_open_clip()
    name, pretrained = open_clip_name(source, "--init openclip:")
    logging.disable(logging.ERROR)  # open_clip logs a failure before raising it: said once, below
    try:
        # without its weights, open_clip would fetch a published text or image tower in their place: none either
        model = open_clip.create_model(name, pretrained=pretrained, load_weights=weights, pretrained_image=weights,
                                       pretrained_text=weights)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:  # noqa: BLE001 - open_clip and the libraries under it fail in their own ways
        raise UsageError(f"--init openclip:{source}: {error_summary(err)}") from None
    finally:
        logging.disable(logging.NOTSET)
    return model, tokenizer


def _open_clip_towers(model) -> tuple:
    """(timm trunk, HF text encoder) of an open_clip model of our kind, else a UsageError saying what differs."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.timm_model import TimmModel

    visual, text = model.visual, getattr(model, "text", None)
    if not isinstance(visual, TimmModel) or not isinstance(text, HFTextEncoder):
        raise UsageError(f"--init openclip: its towers ({type(visual).__name__}, {type(text).__name__}) are neither "
                         f"open_clip's own ViT and text transformer nor a timm and a Hugging Face model")
    head = dict(visual.head.named_children())
    proj = head.get("proj")
    if set(head) - {"drop", "proj"} or proj is None or proj.bias is not None:
        raise UsageError("--init openclip: its image head is not one linear projection without bias")
    if not isinstance(text.proj, torch.nn.Linear) or text.proj.bias is not None:
        raise UsageError("--init openclip: its text head is not one linear projection without bias")
    return visual, text


def _open_clip_architecture(config: ModelConfig, source: str, weights: bool):
    """(architecture, open_clip model, its tokenizer), the model with its published weights if `weights`; for
    open_clip's own transformer towers, the model and tokenizer converted to a transformers CLIPModel and
    tokenizer."""
    model, tokenizer = _load_open_clip(source, weights)
    if native_clip.is_native(model):
        published, hf_tokenizer = native_clip.to_transformers(model, tokenizer)
        return _clip_architecture(config, published.config, model.visual.image_mean, model.visual.image_std,
                                  tokenizer.context_length), published, hf_tokenizer
    visual, text = _open_clip_towers(model)
    pooling = {"ClsLastHiddenStatePooler": "cls", "MeanPooler": "mean"}.get(type(text.pooler).__name__)
    if type(text.pooler).__name__ == "ClsPooler" and not text.pooler.use_pooler_output:
        pooling = "cls"
    if pooling is None:
        raise UsageError(f"--init openclip: text pooler {type(text.pooler).__name__} has no counterpart here")
    architecture = replace(config, image_encoder=visual.trunk.default_cfg["architecture"], image_overrides={},
                           image_size=visual.image_size[0], embed_dim=model.text.output_dim, head="linear",
                           text_encoder=text.config.model_type, text_pooling=pooling, text_overrides={},
                           context_length=tokenizer.context_length, loss="siglip" if model.logit_bias is not None
                           else config.loss, pretrained_image=False, pretrained_text=False)
    return architecture, model, load_tokenizer(tokenizer.tokenizer.name_or_path)


def architecture(config: ModelConfig) -> ModelConfig:
    """`config` with the architecture of the model `config.init` names (its configs; no weights are read)."""
    family, source = _family_and_source(config.init)
    if family == "openai":
        return _openai_architecture(config, source)
    return _open_clip_architecture(config, source, weights=False)[0]


def published_model(config: ModelConfig) -> CLIP:
    """The model `config.init` names as our CLIP (`config` from `architecture`), its weights copied in."""
    family, source = _family_and_source(config.init)
    if family == "openai":
        return _openai_model(config, source)
    _, theirs, tokenizer = _open_clip_architecture(config, source, weights=True)
    if isinstance(theirs, CLIPModel):
        return _from_transformers_clip(config, theirs, tokenizer)
    visual, text = _open_clip_towers(theirs)
    model = build_model(config, tokenizer, text.config)
    model.image_tower.backbone.load_state_dict(visual.trunk.state_dict())
    model.image_head.load_state_dict(visual.head.proj.state_dict())
    model.text_tower.backbone.load_state_dict(text.transformer.state_dict())
    model.text_head.load_state_dict(text.proj.state_dict())
    with torch.no_grad():
        model.log_logit_scale.copy_(theirs.logit_scale)
        if model.logit_bias is not None:
            model.logit_bias.copy_(theirs.logit_bias)
    return model
