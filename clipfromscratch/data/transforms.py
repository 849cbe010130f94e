"""Image preprocessing: PIL image -> normalised (3, S, S) tensor for a tower's size, mean and std."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def image_transform(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool
                    ) -> Callable[[Image.Image], torch.Tensor]:
    """Training: a mild random resized crop (no flips: captions name left and right); evaluation: resize + centre crop."""
    if train:
        geometry = [T.RandomResizedCrop(image_size, scale=(0.8, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    else:
        geometry = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose([T.Lambda(_to_rgb), *geometry, T.ToTensor(), T.Normalize(mean, std)])
