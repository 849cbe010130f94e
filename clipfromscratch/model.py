"""The CLIP model: an image tower and a text tower, projection heads into one space, and a learned temperature."""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from clipfromscratch.config import ModelConfig
from clipfromscratch.data.transforms import image_transform
from clipfromscratch.dcsm import DenseScorer, encode_captions, similarity_maps
from clipfromscratch.encoders.image import build_image_tower, default_image_size
from clipfromscratch.encoders.text import build_text_tower, text_config
from clipfromscratch.errors import UsageError
from clipfromscratch.hf_modeling import MLPHead
from clipfromscratch.objectives import OBJECTIVES
from clipfromscratch.text_tokenizers import tokenize

MAX_LOGIT_SCALE = math.log(100)  # CLIP never lets the logit scale exceed 100


def resolve_image_size(config: ModelConfig) -> ModelConfig:
    """Fill in the preset's resolution so the saved config says what was trained."""
    if config.image_size is not None:
        return config
    return replace(config, image_size=default_image_size(config.image_encoder, config.model_size))


def make_head(kind: str, in_dim: int, embed_dim: int, dropout: float) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, embed_dim, bias=False)
    if kind == "mlp":
        return MLPHead(in_dim, embed_dim, dropout)
    raise UsageError(f"unknown head '{kind}': choose one of linear, mlp")


def _unit(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised in float32 at least: under bf16/fp16 autocast the towers compute in half precision, and what
    meets the embeddings afterwards (a zero-shot classifier, a cache, another model's) is float32."""
    return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)


class CLIP(nn.Module):
    """Two towers and their heads; embeddings are L2-normalised (B, embed_dim)."""

    def __init__(self, config: ModelConfig, image_tower: nn.Module, text_tower: nn.Module,
                 tokenizer: PreTrainedTokenizerFast):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_head = make_head(config.head, image_tower.num_features, config.embed_dim, config.head_dropout)
        self.text_head = make_head(config.head, text_tower.num_features, config.embed_dim, config.head_dropout)
        objective = OBJECTIVES[config.loss]
        # learn log(1/T) so the temperature stays positive
        self.log_logit_scale = nn.Parameter(torch.tensor(objective.init_log_logit_scale))
        self.logit_bias = (None if objective.init_logit_bias is None
                           else nn.Parameter(torch.tensor(objective.init_logit_bias)))
        self.preprocess = image_transform(config.image_size, image_tower.mean, image_tower.std, train=False)
        self.locked_modules: list[nn.Module] = []
        self.dense_scorer: DenseScorer | None = None  # a DCSM head, trained afterwards by `train-dcsm`

    def lock_towers(self, image: bool, text: bool, image_unlocked_groups: int = 0, text_unlocked_layers: int = 0
                    ) -> None:
        """Freeze towers (LiT): no gradients, and eval mode for good so norm statistics and dropout stay fixed.

        With N unlocked groups (layers) the tower's last N layer groups still train; of the rest, every module
        whose own parameters are all frozen stays in eval mode (a ResNet's frozen BatchNorm statistics stay put).
        """
        for tower, lock, unlocked in ((self.image_tower, image, image_unlocked_groups),
                                      (self.text_tower, text, text_unlocked_layers)):
            if not lock:
                continue
            if unlocked == 0:
                tower.requires_grad_(False)
                self.locked_modules.append(tower)
                continue
            groups = tower.layer_groups()
            if unlocked >= len(groups):
                raise UsageError(f"{unlocked} unlocked groups leave nothing of the {len(groups)} layer groups of the "
                                 f"{'image' if tower is self.image_tower else 'text'} tower locked")
            for group in groups[:-unlocked]:
                for p in group:
                    p.requires_grad_(False)
            self.locked_modules += [m for m in tower.modules() if (own := list(m.parameters(recurse=False)))
                                    and not any(p.requires_grad for p in own)]
        self.train(self.training)

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        for module in self.locked_modules:
            module.eval()
        return self

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep exp(t) <= 100 (clamping the parameter, not its use, keeps the gradient alive)."""
        self.log_logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, D) unit vectors, float32 or wider."""
        return _unit(self.image_head(self.image_tower(pixels)))

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, D) unit vectors, float32 or wider."""
        return _unit(self.text_head(self.text_tower(input_ids, attention_mask)))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Captions -> (B, D) unit vectors."""
        device = self.log_logit_scale.device
        tokens = tokenize(self.tokenizer, texts, self.config.context_length)
        return self.encode_tokens(**{k: v.to(device) for k, v in tokens.items()})

    def encode_image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + P, D) unit vectors: the pooled image token (what encode_image returns, for
        linear heads) and every patch, each through the image head into the shared space."""
        return _unit(self.image_head(self.image_tower.forward_tokens(pixels)))

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L, D) unit vectors: every position through the text head."""
        return _unit(self.text_head(self.text_tower.forward_tokens(input_ids, attention_mask)))

    def score(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(N, 3, S, S) images and M captions -> (N, M) scores, higher for a better match: the DCSM head's where
        the model has one, else the scaled cosine. Dense scoring reads every pair's map: meant for scoring
        candidate captions, never a whole retrieval."""
        if self.dense_scorer is None:
            return self.logit_scale() * self.encode_image(pixels) @ self.encode_text(texts).t()
        text_tokens, mask, functional = encode_captions(self.encode_text_tokens, self.tokenizer, texts,
                                                        self.log_logit_scale.device)
        return self.dense_scorer(similarity_maps(self.encode_image_tokens(pixels), text_tokens, mask), functional)


def build_model(config: ModelConfig, tokenizer: PreTrainedTokenizerFast,
                text_hf_config: PretrainedConfig | None = None) -> CLIP:
    """Build the towers named in `config`; a from-scratch text tower gets the vocabulary of `tokenizer`."""
    config = resolve_image_size(config)
    image_tower = build_image_tower(config.image_encoder, config.model_size, config.pretrained_image,
                                    config.image_size, config.image_overrides, config.patch_dropout)
    if text_hf_config is None and not config.pretrained_text:
        special_ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
        text_hf_config = text_config(config.text_encoder, config.model_size, config.text_overrides,
                                     len(tokenizer), {k: v for k, v in special_ids.items() if v is not None})
    text_tower = build_text_tower(config.text_encoder, config.text_pooling, config.pretrained_text, text_hf_config)
    positions = text_tower.max_positions
    if positions is not None and config.context_length > positions:
        raise UsageError(f"option context_length is {config.context_length}: text tower {config.text_encoder} "
                         f"has {positions} positions")
    return CLIP(config, image_tower, text_tower, tokenizer)
