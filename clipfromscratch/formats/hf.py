"""`--format hf`: an export that Hugging Face transformers loads offline, as remote code.

    model = AutoModel.from_pretrained(DIR, trust_remote_code=True)
    tokenizer, image_processor = AutoTokenizer.from_pretrained(DIR), AutoImageProcessor.from_pretrained(DIR)

The folder holds config.json (model type, auto_map, the image tower's resolved timm name and constructor arguments
or its transformers config, the text tower's transformers config, pooling, head, loss), modeling_clipfromscratch.py
(clipfromscratch/hf_modeling.py, the code auto_map names), model.safetensors (our CLIP's own state dict), the
tokenizer's files and preprocessor_config.json (a CLIPImageProcessor doing our evaluation transform).

Remote code, because transformers' own two-tower model cannot hold ours: VisionTextDualEncoderModel projects its
text tower's `pooler_output` (BERT: tanh(dense([CLS])), a layer our towers lack; GPT-2: none at all) where we pool
the first token, the mean or the last token of the hidden states, and its projections are single bias-free linear
layers, not our mlp head.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.nn.functional as F
from safetensors.torch import save_model as save_safetensors
from transformers import AutoModel, AutoTokenizer, CLIPImageProcessor
from transformers.image_utils import PILImageResampling

from clipfromscratch import hf_modeling
from clipfromscratch.encoders.hf_vision import HFVisionTower
from clipfromscratch.encoders.image import ImageTower, timm_arguments
from clipfromscratch.encoders.text import TEXT_ENCODERS
from clipfromscratch.errors import UsageError, error_summary
from clipfromscratch.formats.equality import largest_difference
from clipfromscratch.model import CLIP

MODELING_FILE = "modeling_clipfromscratch.py"
TOKENIZER_CONFIG = "tokenizer_config.json"
AUTO_CLASSES = ("AutoModel", "AutoModelForZeroShotImageClassification")  # the second lets a pipeline load DIR itself


def check_hf(model: CLIP) -> None:
    """A one-line UsageError naming the part of `model` the format cannot hold; call it before any work starts."""
    if model.dense_scorer is not None:
        raise UsageError("hf format: transformers' CLIP interface scores by cosine and has no DCSM head; export the "
                         "model without it")
    tower = model.image_tower
    if isinstance(tower, HFVisionTower):
        return
    if not isinstance(tower, ImageTower):
        raise UsageError(f"hf format: image tower {model.config.image_encoder} is neither a timm nor a transformers "
                         f"model ({type(tower).__name__})")
    # transformers builds the model on the meta device and then loads the file: a non-persistent buffer (a table
    # timm computes from the architecture) gets a value again only from its own module's init_non_persistent_buffers
    unrestored = [f"{name}.{buffer}" if name else buffer for name, module in tower.backbone.named_modules()
                  if not hasattr(module, "init_non_persistent_buffers")
                  for buffer in module._non_persistent_buffers_set]
    if unrestored:
        raise UsageError(f"hf format: timm model {type(tower.backbone).__name__} keeps buffers outside its weights "
                         f"that transformers' loading would leave unset ({', '.join(unrestored[:3])}"
                         f"{', ...' if len(unrestored) > 3 else ''})")


def write_hf(model: CLIP, directory: str) -> None:
    """The export's files into the existing empty `directory` (the caller moves it into place)."""
    config = model.config
    family = TEXT_ENCODERS.get(config.text_encoder)
    siglip = config.loss == "siglip"
    config_class = hf_modeling.ClipFromScratchSiglipConfig if siglip else hf_modeling.ClipFromScratchConfig
    model_class = hf_modeling.ClipFromScratchSiglipModel if siglip else hf_modeling.ClipFromScratchModel
    module = os.path.splitext(MODELING_FILE)[0]
    mean, std = list(model.image_tower.mean), list(model.image_tower.std)
    config_class(
        **_image_tower_fields(model), image_size=config.image_size, image_mean=mean, image_std=std,
        text_config=_architecture(model.text_tower.backbone),
        text_model_kwargs=dict(family.model_kwargs) if family is not None else {},
        text_pooling=model.text_tower.pooling, head=config.head, head_dropout=config.head_dropout,
        embed_dim=config.embed_dim, loss=config.loss, architectures=[model_class.__name__],
        auto_map={"AutoConfig": f"{module}.{config_class.__name__}",
                  **{auto_class: f"{module}.{model_class.__name__}" for auto_class in AUTO_CLASSES}},
    ).save_pretrained(directory)
    shutil.copyfile(hf_modeling.__file__, os.path.join(directory, MODELING_FILE))
    save_safetensors(model, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(model, directory)
    size = config.image_size
    # our evaluation transform: the short side resized (bicubic), a centre crop, scaled to [0, 1], normalised
    CLIPImageProcessor(
        do_convert_rgb=True, do_resize=True, size={"shortest_edge": size}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=mean, image_std=std,
    ).save_pretrained(directory)


def _architecture(backbone: torch.nn.Module) -> dict:
    """A transformers backbone's config, less where it came from (a hub name, for a published tower)."""
    return {k: v for k, v in backbone.config.to_dict().items() if k != "_name_or_path"}


def _image_tower_fields(model: CLIP) -> dict:
    """The config fields that rebuild the image tower: a transformers vision config, or the timm name and
    constructor arguments, resolved as `build_image_tower` resolves them (the preset's, with the input size for a
    ViT, then the image overrides) and put through JSON here, so they are exactly what config.json gives back."""
    config = model.config
    if isinstance(model.image_tower, HFVisionTower):
        return {"vision_config": _architecture(model.image_tower.backbone)}
    timm_name, kwargs = timm_arguments(config.image_encoder, config.model_size, config.image_size)
    return {"timm_name": timm_name, "timm_kwargs": json.loads(json.dumps({**kwargs, **config.image_overrides})),
            "patch_dropout": config.patch_dropout}


def _write_tokenizer(model: CLIP, directory: str) -> None:
    """The tokenizer's files, told the caption length training truncated to and that padding goes on the right
    (where last-token pooling looks for the last real token)."""
    model.tokenizer.save_pretrained(directory)
    path = os.path.join(directory, TOKENIZER_CONFIG)
    with open(path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    tokenizer_config.update(model_max_length=model.config.context_length, padding_side="right")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)


def verify_hf(model: CLIP, directory: str) -> float:
    """Load `directory` with transformers (model and tokenizer) and compare it with `model`
    (`equality.largest_difference`)."""
    try:
        theirs = AutoModel.from_pretrained(directory, trust_remote_code=True)
        # trusted here too: AutoTokenizer reads config.json first, and would ask before running its code
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    except Exception as err:  # noqa: BLE001 - transformers, timm and the remote code fail in their own ways
        raise UsageError(f"hf format: transformers cannot load the export: {error_summary(err)}") from None
    device = model.log_logit_scale.device
    theirs = theirs.to(device).eval()

    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(theirs.get_image_features(pixels).pooler_output, dim=-1)

    def encode_text(captions: list[str]) -> torch.Tensor:
        tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt").to(device)
        features = theirs.get_text_features(tokens["input_ids"], tokens["attention_mask"]).pooler_output
        return F.normalize(features, dim=-1)

    return largest_difference(model, "hf", encode_image, encode_text, theirs.log_logit_scale.exp(),
                              getattr(theirs, "logit_bias", None))
