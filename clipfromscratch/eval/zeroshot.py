"""Zero-shot classification: class prompts become a linear head, averaged over a prompt ensemble."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Template = Callable[[str], str]


@torch.no_grad()
def zeroshot_classifier(encode_text: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                        templates: Sequence[Template]) -> torch.Tensor:
    """(C, D): for each class the mean of its prompts' unit embeddings, re-normalised (CLIP's ensembling)."""
    weights = [F.normalize(encode_text([t(name) for t in templates]).mean(0), dim=-1) for name in classnames]
    return torch.stack(weights)


def zeroshot_accuracy(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> float:
    """Top-1 accuracy of (N, D) images against the (C, D) classifier; samples labelled -1 are left out."""
    keep = labels >= 0
    predictions = (image_features[keep] @ classifier.t()).argmax(1)
    return (predictions == labels[keep]).float().mean().item()
