"""Batched, inference-mode encoding of image datasets and caption lists by an EvalModel."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clipfromscratch.errors import UsageError
from clipfromscratch.eval.data import NO_CLASS, NoClass
from clipfromscratch.eval.models import EvalModel

log = logging.getLogger(__name__)


class Preprocess:
    """Collate (PIL image, target) samples into (B, 3, S, S) pixels, a target list and the count of samples left
    out (None), in the loader worker: what stays is still aligned. NO_CLASS is left out without being counted.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]):
        self.transform = transform

    def __call__(self, samples: list[tuple[Image.Image, object] | None | NoClass]
                 ) -> tuple[torch.Tensor, list, int]:
        skipped = sum(s is None for s in samples)
        samples = [s for s in samples if s is not None and s is not NO_CLASS]
        if not samples:
            return torch.empty(0), [], skipped
        return (torch.stack([self.transform(image) for image, _ in samples]), [target for _, target in samples],
                skipped)


@torch.inference_mode()
def encode_images(model: EvalModel, dataset: Dataset, batch_size: int = 64, num_workers: int = 0
                  ) -> tuple[torch.Tensor, list]:
    """A dataset of (PIL image, target) -> (N, D) unit image embeddings on the CPU and the N targets; samples left
    out are summed up in one line (the dataset logs the first of each reason)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=Preprocess(model.preprocess))
    features, targets, skipped = [], [], 0
    # a bar on a terminal only (disable=None): log files get no carriage-return noise
    for pixels, batch_targets, batch_skipped in tqdm(loader, desc="encoding images", unit="batch", disable=None,
                                                     leave=False):
        skipped += batch_skipped
        if batch_targets:
            features.append(model.encode_image(pixels.to(model.device)).float().cpu())
            targets.extend(batch_targets)
    if not features:
        raise UsageError(f"no readable images to encode: all {skipped} samples were skipped (see the warnings above)"
                         if skipped else "no images to encode: the data holds none this task can use")
    if skipped:
        log.warning("skipped %d unreadable samples (%d images encoded)", skipped, len(targets))
    return torch.cat(features), targets


@torch.inference_mode()
def encode_texts(model: EvalModel, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Captions -> (T, D) unit text embeddings on the CPU."""
    batches = (texts[i:i + batch_size] for i in range(0, len(texts), batch_size))
    return torch.cat([model.encode_text(batch).float().cpu() for batch in batches])
