"""Training objectives as named entries: each owns its starting logit scale and bias, its loss, and how a model
trained with it turns scores into probabilities. The config's `loss` choices, the model, the training step,
evaluation, the benchmarks and the multi-rank tests all read this table; a new objective is one
`register_objective` call (docs/extending.md).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from clipfromscratch.loss import clip_loss, siglip_loss

# (image features, text features, logit scale, logit bias or None, rows: the most rows a rank's batch holds) -> loss
LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int | None], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    init_log_logit_scale: float  # the model learns log(scale)
    init_logit_bias: float | None  # None: models trained with it have no bias
    loss: LossFunction
    probabilities: Callable[[torch.Tensor], torch.Tensor]  # (N, C) logits (scale * cosine + bias) -> probabilities


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, objective: Objective) -> None:
    OBJECTIVES[name] = objective


def _clip(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
          rows: int | None) -> torch.Tensor:
    return clip_loss(images, texts, scale, rows)


def _softmax_over_classes(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=-1)


# CLIP: temperature from 0.07; a softmax over the batch, so over the classes at evaluation
register_objective("clip", Objective(math.log(1 / 0.07), None, _clip, _softmax_over_classes))
# SigLIP: scale from 10 and bias from -10, so that the many negative pairs start with a small loss; trained on
# independent pairs, so each (image, class) pair gets its own sigmoid
register_objective("siglip", Objective(math.log(10), -10.0, siglip_loss, torch.sigmoid))
