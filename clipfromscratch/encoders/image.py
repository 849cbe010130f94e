"""Image towers: the registry of families, and the timm towers (resnet, vit, xception, or any timm model name).

A registered family builds its tower from a size preset, an input resolution and constructor overrides
(`build`), and knows the resolution its presets are made for (`image_size`); transformers' CLIP vision tower is
the other kind (encoders/hf_vision.py). Every tower returns pooled features (B, num_features) and offers
`forward_tokens`, `layer_groups`, `enable_grad_checkpointing`, `image_size`, `mean` and `std`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

import timm
import torch
from timm.layers import PatchDropout
from timm.models import group_parameters
from torch import nn

from clipfromscratch.encoders.registry import Registry, check_size
from clipfromscratch.errors import UsageError, first_line


@dataclass(frozen=True)
class ImagePreset:
    timm_name: str
    image_size: int
    kwargs: dict = field(default_factory=dict)


class ImageFamily(Protocol):
    """What the image registry holds: a family of towers with size presets."""

    def image_size(self, size: str) -> int:
        """The input resolution the preset `size` is made for."""

    def build(self, size: str, pretrained: bool, image_size: int, overrides: dict, patch_dropout: float
              ) -> nn.Module:
        """The tower at `size` and `image_size`, `overrides` winning over the preset."""


@dataclass(frozen=True)
class TimmFamily:
    presets: dict[str, ImagePreset]
    # ViTs bake the input size into their position embeddings; CNNs take any size
    takes_img_size: bool

    def image_size(self, size: str) -> int:
        return self.presets[check_size(size)].image_size

    def timm_arguments(self, size: str, image_size: int) -> tuple[str, dict]:
        """(timm model name, constructor arguments) of the preset `size` at `image_size`."""
        preset = self.presets[check_size(size)]
        return preset.timm_name, dict(preset.kwargs, **({"img_size": image_size} if self.takes_img_size else {}))

    def build(self, size: str, pretrained: bool, image_size: int, overrides: dict, patch_dropout: float
              ) -> ImageTower:
        timm_name, kwargs = self.timm_arguments(size, image_size)
        return build_timm_tower(timm_name, kwargs, pretrained, image_size, overrides, patch_dropout)


IMAGE_ENCODERS: Registry[ImageFamily] = Registry("image encoder", "any timm model name (e.g. convnext_tiny)")
IMAGE_ENCODERS.register("resnet", TimmFamily(
    presets={
        "tiny": ImagePreset("resnet50", 32, dict(layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=32)),
        "base": ImagePreset("resnet50", 224),
    },
    takes_img_size=False,
))
IMAGE_ENCODERS.register("vit", TimmFamily(
    presets={
        "tiny": ImagePreset("vit_base_patch16_224", 32, dict(patch_size=8, embed_dim=128, depth=4, num_heads=4)),
        "base": ImagePreset("vit_base_patch16_224", 224),
    },
    takes_img_size=True,
))
IMAGE_ENCODERS.register("xception", TimmFamily(
    presets={
        # timm's aligned Xception needs two or more blocks (one block divides by zero in its drop-path schedule)
        "tiny": ImagePreset("xception41", 32, dict(block_cfg=[
            dict(in_chs=64, out_chs=96, stride=2),
            dict(in_chs=96, out_chs=192, stride=2),
            dict(in_chs=192, out_chs=(192, 256, 256), stride=2),
        ])),
        # timm 1.0 has no plain `xception`: legacy_xception is Chollet's original architecture
        "base": ImagePreset("legacy_xception", 299),
    },
    takes_img_size=False,
))


class ImageTower(nn.Module):
    """A timm backbone with its classifier removed: (B, 3, H, W) -> (B, num_features)."""

    def __init__(self, backbone: nn.Module, image_size: int):
        super().__init__()
        self.backbone = backbone
        self.num_features: int = backbone.num_features
        self.image_size = image_size
        cfg = backbone.pretrained_cfg
        self.mean: tuple[float, ...] = tuple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
        self.std: tuple[float, ...] = tuple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels)

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + P, num_features): the pooled feature `forward` returns, then P patch features.

        A ViT's patches are its last tokens after the final norm (prefix tokens such as CLS dropped: the pooled
        feature stands for them); a CNN's are the cells of its last feature map.
        """
        features = self.backbone.forward_features(pixels)
        pooled = self.backbone.forward_head(features, pre_logits=True)
        if features.ndim == 4:  # (B, C, H, W) -> (B, H * W, C)
            patches = features.flatten(2).transpose(1, 2)
        else:
            patches = features[:, getattr(self.backbone, "num_prefix_tokens", 0):]
        return torch.cat([pooled.unsqueeze(1), patches], dim=1)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The tower's parameters in timm's layer groups, from the input up: the stem, each block or stage (a
        ViT's final norm with its last block)."""
        named = dict(self.backbone.named_parameters())
        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=False))
        return [[named[name] for name in names] for names in groups.values()]

    def enable_grad_checkpointing(self) -> None:
        try:
            self.backbone.set_grad_checkpointing(True)
        except AssertionError:  # timm's way of saying a model has no checkpointed blocks
            raise UsageError(f"timm model {type(self.backbone).__name__} has no gradient checkpointing") from None


def default_image_size(name: str, size: str) -> int:
    """The input resolution a family's preset is built for (any other timm model: its pretrained config's)."""
    family = IMAGE_ENCODERS.get(name)
    if family is not None:
        return family.image_size(size)
    if not timm.is_model(name):
        raise IMAGE_ENCODERS.unknown(name)
    return timm.get_pretrained_cfg(name).input_size[-1]


def build_image_tower(name: str, size: str, pretrained: bool, image_size: int, overrides: dict,
                      patch_dropout: float = 0.0) -> nn.Module:
    """Build the tower `name` at `size`; `overrides` are constructor arguments that win over the preset;
    `patch_dropout` drops that share of a ViT's patch tokens in training mode (FLIP)."""
    family = IMAGE_ENCODERS.get(name)
    if family is not None:
        return family.build(size, pretrained, image_size, overrides, patch_dropout)
    if timm.is_model(name):
        return build_timm_tower(name, {}, pretrained, image_size, overrides, patch_dropout)
    raise IMAGE_ENCODERS.unknown(name)


def timm_arguments(name: str, size: str, image_size: int) -> tuple[str, dict]:
    """(timm model name, constructor arguments before image_overrides) of a timm image tower: a family's preset,
    or a timm name as it is."""
    family = IMAGE_ENCODERS.get(name)
    return family.timm_arguments(size, image_size) if isinstance(family, TimmFamily) else (name, {})


def build_timm_tower(timm_name: str, kwargs: dict, pretrained: bool, image_size: int, overrides: dict,
                     patch_dropout: float) -> ImageTower:
    """timm's `timm_name` with constructor `kwargs`, `overrides` over them."""
    kwargs = {**kwargs, **overrides}
    try:
        backbone = timm.create_model(timm_name, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError) as err:
        if pretrained and not overrides:
            raise UsageError(f"cannot load pretrained weights for timm model '{timm_name}' (offline or not "
                             f"published?): {first_line(err)}") from None
        raise _bad_tower(timm_name, overrides, image_size, err) from None
    except (TypeError, ValueError, AssertionError, KeyError) as err:  # how timm says an argument makes no sense
        raise _bad_tower(timm_name, overrides, image_size, err) from None
    if patch_dropout:
        if not isinstance(getattr(backbone, "patch_drop", None), nn.Module):
            raise UsageError(f"--patch-dropout needs a ViT-style image tower: timm model '{timm_name}' has no patch "
                             "tokens to drop")
        # timm's own module, set after construction so that presets, overrides and pretrained weights are untouched
        backbone.patch_drop = PatchDropout(patch_dropout, num_prefix_tokens=backbone.num_prefix_tokens)
    _check_forward(backbone, timm_name, overrides, image_size)
    return ImageTower(backbone, image_size)


def _check_forward(backbone: nn.Module, timm_name: str, overrides: dict, image_size: int) -> None:
    """One image through the new tower: a size or override it cannot take fails here, in one line, not mid-run."""
    was_training = backbone.training
    backbone.eval()  # batch statistics of a single image would fail, and must not move the running ones
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError, TypeError) as err:
        raise _bad_tower(timm_name, overrides, image_size, err) from None
    backbone.train(was_training)


def _bad_tower(timm_name: str, overrides: dict, image_size: int, err: Exception) -> UsageError:
    given = f" with image_overrides {json.dumps(overrides)}" if overrides else ""
    return UsageError(f"timm model '{timm_name}' at {image_size} px{given} cannot be built or run: {first_line(err)}")
