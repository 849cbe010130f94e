"""Batched, inference-mode encoding of image datasets and caption lists by an EvalModel."""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipfromscratch.errors import UsageError
from clipfromscratch.eval.models import EvalModel


class Preprocess:
    """Collate (PIL image, target) samples into (B, 3, S, S) pixels and a target list, in the loader worker.

    Samples that could not be read are None and left out, with their targets: what stays is still aligned.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]):
        self.transform = transform

    def __call__(self, samples: list[tuple[Image.Image, object] | None]) -> tuple[torch.Tensor, list]:
        samples = [s for s in samples if s is not None]
        if not samples:
            return torch.empty(0), []
        return torch.stack([self.transform(image) for image, _ in samples]), [target for _, target in samples]


@torch.inference_mode()
def encode_images(model: EvalModel, dataset: Dataset, batch_size: int = 64, num_workers: int = 0
                  ) -> tuple[torch.Tensor, list]:
    """A dataset of (PIL image, target) -> (N, D) unit image embeddings on the CPU and the N targets."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=Preprocess(model.preprocess))
    features, targets = [], []
    for pixels, batch_targets in loader:
        if batch_targets:
            features.append(model.encode_image(pixels.to(model.device)).float().cpu())
            targets.extend(batch_targets)
    if not features:
        raise UsageError("no readable images to encode")
    return torch.cat(features), targets


@torch.inference_mode()
def encode_texts(model: EvalModel, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Captions -> (T, D) unit text embeddings on the CPU."""
    batches = (texts[i:i + batch_size] for i in range(0, len(texts), batch_size))
    return torch.cat([model.encode_text(batch).float().cpu() for batch in batches])
