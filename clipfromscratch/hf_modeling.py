"""A clipfromscratch model as transformers remote code: `AutoModel.from_pretrained(DIR, trust_remote_code=True)`.

`--format hf` copies this file into every export as modeling_clipfromscratch.py, so it imports only torch, timm and
transformers. The config rebuilds both towers offline (the image tower a timm model name with its constructor
arguments, or a transformers vision config; the text tower a transformers config), and the modules are
clipfromscratch's CLIP, parameter names included, so the export's model.safetensors is the training code's own
state dict; our model takes its mlp head and its pooling rule from here, so the two cannot drift apart. The
interface is CLIPModel's: `get_image_features`, `get_text_features` and `forward` returning a
CLIPOutput, so transformers' zero-shot pipeline takes the model.
"""
import math
from typing import ClassVar

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchDropout
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPOutput
from transformers.utils.generic import can_return_tuple

# where a model built from its config alone starts (trained values come from model.safetensors): CLIP's temperature
# 0.07, SigLIP's scale 10 and bias -10, as clipfromscratch trains them
INIT_LOG_LOGIT_SCALE = {"clip": math.log(1 / 0.07), "siglip": math.log(10)}
INIT_LOGIT_BIAS = -10.0


class ClipFromScratchConfig(PreTrainedConfig):
    """What rebuilds the model.

    timm_name, timm_kwargs: `timm.create_model(timm_name, num_classes=0, **timm_kwargs)` is the image tower;
    vision_config: instead, a transformers vision model (CLIPVisionModel), pooled by its own `pooler_output`;
    image_size, image_mean, image_std: its input (preprocessor_config.json applies them);
    patch_dropout: the share of a timm ViT's patch tokens dropped in training mode (FLIP), none in evaluation;
    text_config, text_model_kwargs: `AutoModel.from_config(text_config, **text_model_kwargs)` is the text tower;
    text_pooling: cls (first token), mean (over real tokens) or last (last real token; padding on the right);
    head: linear (no bias) or mlp (GELU, dropout head_dropout, residual, LayerNorm), into embed_dim;
    loss: clip (logits are scale * cosine) or siglip (scale * cosine + a learned bias).
    """

    model_type = "clipfromscratch"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", optional=True),
    }

    timm_name: str | None = None
    timm_kwargs: dict | None = None
    vision_config: PreTrainedConfig | dict | None = None
    image_size: int = 224
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    patch_dropout: float = 0.0
    text_config: PreTrainedConfig | dict | None = None
    text_model_kwargs: dict | None = None
    text_pooling: str = "cls"
    head: str = "linear"
    head_dropout: float = 0.1
    embed_dim: int = 256
    loss: str = "clip"


class ClipFromScratchSiglipConfig(ClipFromScratchConfig):
    """A model trained with the SigLIP loss: transformers' zero-shot pipeline reads "siglip" in the model type and
    scores each label with a sigmoid, as SigLIP's own models are scored, instead of a softmax over the labels."""

    model_type = "clipfromscratch_siglip"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, H) hidden states, (B, L) right-padded mask -> (B, H)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    last = attention_mask.sum(1).clamp(min=1) - 1  # index of the last real token, padding is on the right
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


class TimmImageTower(nn.Module):
    """A timm backbone without its classifier: (B, 3, S, S) -> its last features and the pooled (B, num_features)."""

    def __init__(self, config: ClipFromScratchConfig):
        super().__init__()
        # pretrained=False: the weights come from the export, never from the network
        self.backbone = timm.create_model(config.timm_name, pretrained=False, num_classes=0,
                                          **(config.timm_kwargs or {}))
        if config.patch_dropout:
            self.backbone.patch_drop = PatchDropout(config.patch_dropout,
                                                    num_prefix_tokens=self.backbone.num_prefix_tokens)
        self.num_features: int = self.backbone.num_features

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # timm's own forward in its two steps, to hand back the features before pooling too
        features = self.backbone.forward_features(pixel_values)
        return features, self.backbone.forward_head(features)


class TransformersImageTower(nn.Module):
    """A transformers vision backbone: (B, 3, S, S) -> its last hidden state and its `pooler_output` (B, width)."""

    def __init__(self, config: ClipFromScratchConfig):
        super().__init__()
        self.backbone = AutoModel.from_config(config.vision_config)
        self.num_features: int = config.vision_config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.backbone(pixel_values=pixel_values)
        return output.last_hidden_state, output.pooler_output


class TextTower(nn.Module):
    """A transformers backbone and a pooling rule: (B, L) ids, mask -> hidden states (B, L, H) and pooled (B, H)."""

    def __init__(self, config: ClipFromScratchConfig):
        super().__init__()
        self.backbone = AutoModel.from_config(config.text_config, **(config.text_model_kwargs or {}))
        self.pooling = config.text_pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, pool(hidden, attention_mask, self.pooling)


class MLPHead(nn.Module):
    """Linear -> GELU -> linear -> dropout, plus a residual from the first projection, then LayerNorm."""

    def __init__(self, in_dim: int, embed_dim: int, dropout: float):
        super().__init__()
        self.projection = nn.Linear(in_dim, embed_dim)
        self.fc = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        return self.norm(projected + self.dropout(self.fc(F.gelu(projected))))


def make_head(config: ClipFromScratchConfig, in_dim: int) -> nn.Module:
    if config.head == "linear":
        return nn.Linear(in_dim, config.embed_dim, bias=False)
    if config.head == "mlp":
        return MLPHead(in_dim, config.embed_dim, config.head_dropout)
    raise ValueError(f"unknown head '{config.head}': choose one of linear, mlp")


class ClipFromScratchModel(PreTrainedModel):
    """Two towers, their heads and a learned logit scale (and bias, for SigLIP), with CLIPModel's interface."""

    config_class = ClipFromScratchConfig
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _supports_sdpa = True  # for the transformers towers: timm's attention picks its own kernel

    def __init__(self, config: ClipFromScratchConfig):
        super().__init__(config)
        self.image_tower = (TransformersImageTower if config.vision_config is not None else TimmImageTower)(config)
        self.text_tower = TextTower(config)
        self.image_head = make_head(config, self.image_tower.num_features)
        self.text_head = make_head(config, self.text_tower.backbone.config.hidden_size)
        self.log_logit_scale = nn.Parameter(torch.tensor(INIT_LOG_LOGIT_SCALE[config.loss]))
        self.logit_bias = nn.Parameter(torch.tensor(INIT_LOGIT_BIAS)) if config.loss == "siglip" else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Every weight comes from model.safetensors, and a model built from its config keeps its towers' own
        initialisation; what loading leaves empty is a timm module's non-persistent buffers (tables computed from
        the architecture), which timm recomputes itself. A transformers tower's are its own `_init_weights`'."""
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        """(B, 3, S, S) preprocessed images -> `pooler_output`: (B, embed_dim) projected, not yet normalised (as
        CLIPModel's); `last_hidden_state`: the image tower's features before pooling."""
        features, pooled = self.image_tower(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=self.image_head(pooled))

    @can_return_tuple
    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                          ) -> BaseModelOutputWithPooling:
        """(B, L) right-padded ids and mask -> `pooler_output`: (B, embed_dim) projected, not yet normalised (as
        CLIPModel's); `last_hidden_state`: the text tower's hidden states."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden, pooled = self.text_tower(input_ids, attention_mask)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=self.text_head(pooled))

    @can_return_tuple
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> CLIPOutput:
        """Images and texts -> CLIPOutput: `logits_per_image` (N images, M texts) = scale * cosine (+ bias for
        SigLIP), `logits_per_text` its transpose, and the unit `image_embeds`, `text_embeds`.

        `token_type_ids` (what a BERT tokenizer returns) are accepted and ignored: the text tower was trained
        without them, and GPT-2 would add them to its inputs as token embeddings."""
        image_output = self.get_image_features(pixel_values, return_dict=True)
        text_output = self.get_text_features(input_ids, attention_mask, return_dict=True)
        image_embeds = F.normalize(image_output.pooler_output, dim=-1)
        text_embeds = F.normalize(text_output.pooler_output, dim=-1)
        logits_per_text = self.log_logit_scale.exp() * text_embeds @ image_embeds.t()
        if self.logit_bias is not None:
            logits_per_text = logits_per_text + self.logit_bias
        return CLIPOutput(logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                          text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text_output,
                          vision_model_output=image_output)


class ClipFromScratchSiglipModel(ClipFromScratchModel):
    """The model of a ClipFromScratchSiglipConfig (transformers pairs each model class with one config class)."""

    config_class = ClipFromScratchSiglipConfig
