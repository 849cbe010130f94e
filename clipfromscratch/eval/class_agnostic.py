"""Class-agnostic features: an image's similarities to prompts that never name a class (Benedetto's thesis on
CLIP, chapters 3-4).

How peaked the softmax over the prompts is (its entropy, at most log(#prompts)) says whether the prompts
separate the images at all; a temperature below 1 sharpens it before the probe sees it.
"""
from __future__ import annotations

import math

import torch

TEMPERATURES = (1.0, 0.5, 0.07, 0.03, 0.02)


def prompt_logits(image_features: torch.Tensor, prompt_features: torch.Tensor) -> torch.Tensor:
    """(N, D) and (P, D) unit vectors -> (N, P) cosine similarities."""
    return image_features @ prompt_features.t()


def softmax_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N, P) -> (N,) Shannon entropy (nats) of softmax(logits / temperature)."""
    log_p = torch.log_softmax(logits / temperature, dim=1)
    return -(log_p.exp() * log_p).sum(1)


def max_entropy(num_prompts: int) -> float:
    """The entropy of the uniform distribution: what a model that cannot tell the prompts apart scores."""
    return math.log(num_prompts)


def tempered_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The features of the temperature sweep: softmax(logits / temperature)."""
    return torch.softmax(logits / temperature, dim=1)
