"""Our models in open_clip's form and back: a `local-dir:` folder that open_clip 3.x loads offline, and open_clip
models of the same kind (a timm image tower and a Hugging Face text tower) as our CLIP.

open_clip's `CustomTextCLIP` holds our timm + transformers models exactly when
- the image tower is a timm model that `timm.create_model(name)` builds with no extra arguments (open_clip's
  TimmModel passes none: not our tiny presets, not image_overrides; a fixed-size model such as a ViT at its
  default resolution), pooled by timm's own pooling, with a linear head without bias;
- the text tower's model type is one open_clip has an entry for (hf_configs.arch_dict: bert, roberta,
  xlm-roberta, mt5, m2m_100), pooled by `cls` or `mean` (open_clip has no last-token pooler), with a linear head;
- there is no DCSM head.
Anything else is refused in one line before a file is written; what is written is then loaded back with
open_clip and its embeddings compared with ours, so a folder that would load into something different is never
left behind.

open_clip finds the text tower's architecture by `hf_model_name`, a hub name or a folder: here the export's own
`text_tower/` folder by its absolute path (open_clip would otherwise fetch a config from the hub by name), so an
export moved elsewhere must be exported again.
"""
from __future__ import annotations

import json
import os

import timm
import torch
from safetensors.torch import save_file

from clipfromscratch.encoders.image import ImageTower, timm_arguments
from clipfromscratch.encoders.text import TextTower
from clipfromscratch.errors import UsageError, error_summary
from clipfromscratch.formats.equality import largest_difference
from clipfromscratch.model import CLIP

CONFIG, WEIGHTS, TEXT_TOWER_DIR = "open_clip_config.json", "open_clip_model.safetensors", "text_tower"
POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}
# our parameter names -> open_clip CustomTextCLIP's
PREFIXES = (("image_tower.backbone.", "visual.trunk."), ("image_head.", "visual.head.proj."),
            ("text_tower.backbone.", "text.transformer."), ("text_head.", "text.proj."),
            ("log_logit_scale", "logit_scale"), ("logit_bias", "logit_bias"))


def import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise UsageError("open_clip models need the open_clip_torch package: pip install "
                         "'clipfromscratch[openclip]'") from None
    return open_clip


def open_clip_name(spec: str, what: str) -> tuple[str, str | None]:
    """open_clip's (model name, pretrained) for `spec`: a folder (`local-dir:`) or `<arch>/<tag or file>`."""
    if os.path.isdir(spec):
        return f"local-dir:{spec}", None
    arch, _, tag = spec.partition("/")
    if not arch or not tag:
        raise UsageError(f"{what}{spec}: write {what}<arch>/<pretrained tag or file> (e.g. "
                         f"{what}ViT-B-32/laion2b_s34b_b79k) or {what}<open_clip folder>")
    return arch, tag


def _timm_name(model: CLIP) -> str:
    """The timm model that `timm.create_model(name, num_classes=0)` alone rebuilds as our image tower, or a
    UsageError saying why there is none."""
    config = model.config
    if not isinstance(model.image_tower, ImageTower):
        raise UsageError(f"open_clip format: image tower {config.image_encoder} is not a timm model (open_clip holds "
                         f"timm image towers; use --format hf)")
    if config.image_overrides:
        raise UsageError(f"open_clip format: image_overrides {json.dumps(config.image_overrides)} are timm arguments "
                         f"that open_clip's timm tower cannot pass")
    name, kwargs = timm_arguments(config.image_encoder, config.model_size, config.image_size)
    kwargs.pop("img_size", None)  # open_clip builds timm models at their own input size: checked below
    if kwargs:
        raise UsageError(f"open_clip format: the {config.model_size} {config.image_encoder} preset is built with "
                         f"timm arguments ({', '.join(kwargs)}) that open_clip's timm tower cannot pass")
    default_size = timm.get_pretrained_cfg(name).input_size[-1]
    if hasattr(model.image_tower.backbone, "patch_embed") and config.image_size != default_size:
        raise UsageError(f"open_clip format: timm model {name} is built for {default_size} px; open_clip cannot build "
                         f"it at {config.image_size} px")
    return name


def check_open_clip(model: CLIP) -> None:
    """A one-line UsageError naming the part of `model` that open_clip cannot hold; None when it holds it all."""
    import_open_clip()
    _timm_name(model)
    config, text = model.config, model.text_tower
    if config.head != "linear":
        raise UsageError("open_clip format: our mlp head (residual, LayerNorm) has no open_clip counterpart; "
                         "only linear heads export")
    if model.dense_scorer is not None:
        raise UsageError("open_clip format: open_clip has no DCSM head; export the model without it")
    from open_clip.hf_configs import arch_dict

    model_type = text.backbone.config.model_type
    if not isinstance(text, TextTower) or model_type not in arch_dict:
        raise UsageError(f"open_clip format: open_clip has no Hugging Face text tower of type {model_type} (it has "
                         f"{', '.join(arch_dict)})")
    if text.pooling not in POOLERS:
        raise UsageError(f"open_clip format: text pooling '{text.pooling}' has no open_clip pooler (it pools "
                         f"{' or '.join(POOLERS)})")
    special = {model.tokenizer.pad_token_id} & {model.tokenizer.eos_token_id, model.tokenizer.cls_token_id,
                                                model.tokenizer.sep_token_id}
    if special:
        raise UsageError("open_clip format: the tokenizer pads with one of its own real tokens, which open_clip's "
                         "text tower would mask out")


def open_clip_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    def renamed(name: str) -> str:
        for ours, theirs in PREFIXES:
            if name.startswith(ours):
                return theirs + name[len(ours):]
        raise AssertionError(f"no open_clip name for {name}")

    return {renamed(name): tensor.detach().contiguous() for name, tensor in model.state_dict().items()}


def write_open_clip(model: CLIP, directory: str) -> None:
    """The files open_clip's `local-dir:` reads into the existing folder `directory`, its config pointing at
    `directory`'s own text tower (`point_at` moves that pointer with the folder)."""
    model.text_tower.backbone.config.save_pretrained(os.path.join(directory, TEXT_TOWER_DIR))
    config = model.config
    model_cfg = {
        "embed_dim": config.embed_dim,
        "vision_cfg": {"timm_model_name": _timm_name(model), "timm_model_pretrained": False,
                       "timm_pool": "",  # timm's own pooling, as our tower's
                       "timm_proj": "linear", "timm_proj_bias": False, "image_size": config.image_size,
                       "patch_dropout": config.patch_dropout},
        "text_cfg": {"hf_model_pretrained": False, "hf_proj_type": "linear",
                     "hf_pooler_type": POOLERS[model.text_tower.pooling], "context_length": config.context_length,
                     "vocab_size": len(model.tokenizer)},
        "custom_text": True,
    }
    if model.logit_bias is not None:
        model_cfg["init_logit_bias"] = model.logit_bias.item()
    preprocess_cfg = {"size": config.image_size, "mode": "RGB", "mean": list(model.image_tower.mean),
                      "std": list(model.image_tower.std), "interpolation": "bicubic", "resize_mode": "shortest"}
    with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
    point_at(directory, directory)
    save_file(open_clip_state_dict(model), os.path.join(directory, WEIGHTS))
    model.tokenizer.save_pretrained(directory)


def point_at(directory: str, final_directory: str) -> None:
    """Set the config in `directory` to find the text tower (and tokenizer) in `final_directory`, by absolute path."""
    path = os.path.join(directory, CONFIG)
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    final_directory = os.path.abspath(final_directory)
    saved["model_cfg"]["text_cfg"].update(hf_model_name=os.path.join(final_directory, TEXT_TOWER_DIR),
                                          hf_tokenizer_name=final_directory)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(saved, f, indent=2)


def verify_open_clip(model: CLIP, directory: str) -> float:
    """Load `directory` with open_clip and compare it with `model` (`equality.largest_difference`)."""
    open_clip = import_open_clip()
    try:
        theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{directory}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    except Exception as err:  # noqa: BLE001 - open_clip and the libraries under it fail in their own ways
        raise UsageError(f"open_clip cannot load the export: {error_summary(err)}") from None
    theirs = theirs.to(model.log_logit_scale.device).eval()
    return largest_difference(
        model, "open_clip", lambda pixels: theirs.encode_image(pixels, normalize=True),
        lambda captions: theirs.encode_text(tokenizer(captions).to(model.log_logit_scale.device), normalize=True),
        theirs.logit_scale.exp(), getattr(theirs, "logit_bias", None))
