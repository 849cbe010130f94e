"""The check an export passes before it is put in place: the other library, loading the written folder, gives our
embeddings of random images and of captions, and our temperature (and bias), within EQUALITY_TOLERANCE."""
from __future__ import annotations

from collections.abc import Callable

import torch

from clipfromscratch.errors import UsageError
from clipfromscratch.model import CLIP

EQUALITY_TOLERANCE = 1e-4  # max abs difference of unit embeddings in fp32
CAPTIONS = ["a photo of a red dress", "two dogs playing in the snow near a small wooden house"]


def largest_difference(model: CLIP, format_name: str, encode_image: Callable[[torch.Tensor], torch.Tensor],
                       encode_text: Callable[[list[str]], torch.Tensor], logit_scale: torch.Tensor,
                       logit_bias: torch.Tensor | None = None) -> float:
    """The largest difference between the loaded model (`encode_image`, `encode_text`: unit vectors; its scale and
    bias) and `model`, relative for the scale; a UsageError when it is over EQUALITY_TOLERANCE."""
    was_training = model.training
    model.eval()
    size, device = model.config.image_size, model.log_logit_scale.device
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        differences = [(encode_image(pixels) - model.encode_image(pixels)).abs().max(),
                       (encode_text(CAPTIONS) - model.encode_text(CAPTIONS)).abs().max(),
                       (logit_scale - model.logit_scale()).abs() / model.logit_scale()]
        if model.logit_bias is not None:
            differences.append((logit_bias - model.logit_bias).abs())
    model.train(was_training)
    worst = max(d.item() for d in differences)
    if not worst <= EQUALITY_TOLERANCE:
        raise UsageError(f"{format_name} format: the export loads into a model whose embeddings differ from ours by "
                         f"{worst:.2g} (over {EQUALITY_TOLERANCE:g}); nothing was written")
    return worst
