"""The contrastive losses, over the global batch when training on several ranks: CLIP's symmetric InfoNCE and
SigLIP's pairwise sigmoid loss.

Under torch.distributed, every rank scores its own rows against the columns of all ranks: features are
all-gathered with gradient, so after DDP averages the ranks' gradients they equal the gradient of the loss on
the whole global batch, with memory O(B_local x B_global). This is the only module that talks to other ranks
about the loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(B, D), (N, D) L2-normalised, scalar scale -> (B, N) logits of each image row against each text column."""
    return logit_scale * image_features @ text_features.t()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGather(torch.autograd.Function):
    """Every rank's rows stacked in rank order; backward hands each rank the gradient of its rows summed over the
    losses of all ranks (each rank's loss reads every rank's rows)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, features.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(features: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's (sizes[r], D) rows concatenated in rank order; gradients flow back to each rank's own rows."""
    # collectives need equal shapes: pad to the largest batch (a rank may have dropped unreadable samples)
    padded = F.pad(features, (0, 0, 0, max(sizes) - features.size(0)))
    parts = _AllGather.apply(padded).chunk(len(sizes))
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def _batch_sizes(features: torch.Tensor) -> list[int]:
    """Every rank's batch size, in rank order."""
    sizes = [torch.zeros((), dtype=torch.long, device=features.device) for _ in range(_world_size())]
    dist.all_gather(sizes, torch.tensor(features.size(0), device=features.device))
    return [int(size) for size in sizes]


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies; row i's positive is column i.

    (B, D) L2-normalised features and the scale exp(t). In a single process the negatives are the batch; under
    torch.distributed with several ranks, they are the batches of all ranks, and the returned value is this
    rank's share, weighted so that the mean over ranks is the loss of the global batch.
    """
    batch = image_features.size(0)
    if _world_size() == 1:
        logits = clip_logits(image_features, text_features, logit_scale)
        labels = torch.arange(batch, device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    sizes = _batch_sizes(image_features)
    all_images = gather_with_grad(image_features, sizes)
    all_texts = gather_with_grad(text_features, sizes)
    labels = torch.arange(batch, device=image_features.device) + sum(sizes[:dist.get_rank()])
    image_to_text = F.cross_entropy(clip_logits(image_features, all_texts, logit_scale), labels, reduction="sum")
    text_to_image = F.cross_entropy(clip_logits(text_features, all_images, logit_scale), labels, reduction="sum")
    # DDP averages over ranks: this rank's sum over its rows, times world / global rows, averages to the global mean
    return (image_to_text + text_to_image) / 2 * len(sizes) / sum(sizes)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: every (image, caption) pair is a binary question, true on the diagonal alone.

    -sum of log sigmoid(+-(scale * cos + bias)) over all pairs, divided by the number of images, as open_clip's
    `SigLipLoss`. Under torch.distributed each rank scores its images against the captions of all ranks
    (gathered once, with gradient; not open_clip's rank-by-rank exchange), so every pair of the global batch is
    counted once, and the returned value is weighted so that the mean over ranks is the global-batch loss.
    """
    if _world_size() == 1:
        texts, first = text_features, 0
    else:
        sizes = _batch_sizes(image_features)
        texts, first = gather_with_grad(text_features, sizes), sum(sizes[:dist.get_rank()])
    logits = logit_scale * image_features @ texts.t() + logit_bias
    rows = torch.arange(image_features.size(0), device=logits.device)
    signs = -torch.ones_like(logits)
    signs[rows, rows + first] = 1.0
    total = -F.logsigmoid(signs * logits).sum()
    if _world_size() == 1:
        return total / image_features.size(0)
    # DDP averages over ranks: this rank's pairs, times world / global images, average to the global loss
    return total * len(sizes) / sum(sizes)
