"""Image towers built with transformers: CLIP's vision transformer (`clip_vision`), the tower of OpenAI's models.

Its pooled feature is what CLIPModel projects (the class token after the post-norm), so a published CLIP's image
tower and `visual_projection` become this tower and a linear head without any change (`--init openai:`).
`image_overrides` are config fields over the preset (e.g. patch_size, hidden_size); `image_mean` and
`image_std` among them set the normalisation the tower's images get.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPVisionModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from clipfromscratch.encoders.image import IMAGE_ENCODERS
from clipfromscratch.encoders.registry import check_size
from clipfromscratch.encoders.text import TransformersTower
from clipfromscratch.errors import UsageError, error_summary, first_line

NORMALISATION_KEYS = ("image_mean", "image_std")


class HFVisionTower(TransformersTower):
    """A transformers vision backbone whose `pooler_output` is the pooled feature: (B, 3, S, S) -> (B, width)."""

    def __init__(self, backbone: nn.Module, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.num_features: int = backbone.config.hidden_size
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixels).pooler_output

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + P, width): every token through the post-norm that the pooled class token gets,
        so token 0 is the pooled feature, then the P patches."""
        return self.backbone.post_layernorm(self.backbone(pixel_values=pixels).last_hidden_state)


@dataclass(frozen=True)
class HFVisionFamily:
    hub_name: str  # where `pretrained: true` loads weights from
    model_type: str
    presets: dict[str, dict]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    backbone_class: type

    def image_size(self, size: str) -> int:
        return AutoConfig.for_model(self.model_type, **self.presets[check_size(size)]).image_size

    def build(self, size: str, pretrained: bool, image_size: int, overrides: dict, patch_dropout: float
              ) -> HFVisionTower:
        if patch_dropout:
            raise UsageError(f"--patch-dropout needs a timm ViT image tower: {self.model_type} has no patch dropout")
        fields = {k: v for k, v in overrides.items() if k not in NORMALISATION_KEYS}
        mean, std = overrides.get("image_mean", self.mean), overrides.get("image_std", self.std)
        try:
            if pretrained:
                backbone = self.backbone_class.from_pretrained(self.hub_name, **fields)
            else:
                config = AutoConfig.for_model(self.model_type, **{**self.presets[check_size(size)],
                                                                  "image_size": image_size, **fields})
                backbone = AutoModel.from_config(config)
        except OSError as err:
            raise UsageError(f"cannot load pretrained image tower '{self.hub_name}' (offline?): "
                             f"{first_line(err)}") from None
        except Exception as err:  # noqa: BLE001 - transformers rejects a bad field with errors of several types
            raise UsageError(f"{self.model_type} with image_overrides {fields} cannot be built: "
                             f"{error_summary(err)}") from None
        if backbone.config.image_size != image_size:
            raise UsageError(f"image tower {self.model_type} is made for {backbone.config.image_size} px images, "
                             f"not {image_size}")
        return HFVisionTower(backbone, image_size, mean, std)


IMAGE_ENCODERS.register("clip_vision", HFVisionFamily(
    hub_name="openai/clip-vit-base-patch32",
    model_type="clip_vision_model",
    presets={
        "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     image_size=32, patch_size=8),
        "base": {},  # CLIPVisionConfig defaults: OpenAI's ViT-B/32 at 224 px
    },
    mean=tuple(OPENAI_CLIP_MEAN),
    std=tuple(OPENAI_CLIP_STD),
    backbone_class=CLIPVisionModel,
))
