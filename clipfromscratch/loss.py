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


def _real_rows(batch: int, rows: int, device: torch.device) -> torch.Tensor:
    """(world x rows,) which rows of the padded gather (`_gather_padded`) hold a rank's samples."""
    real = (torch.arange(rows, device=device) < batch).to(torch.uint8)  # gloo gathers no bool tensors
    reals = [torch.empty_like(real) for _ in range(dist.get_world_size())]
    dist.all_gather(reals, real)
    return torch.cat(reals).bool()


def _gather_padded(features: torch.Tensor, rows: int) -> torch.Tensor:
    """Every rank's (n <= rows, D) features padded to `rows`, in rank order: (world x rows, D), with gradient to
    each rank's own rows. `rows` is known to every rank in advance, so no rank reads another's batch size back
    to the host (that would be a sync at every step)."""
    return _AllGather.apply(F.pad(features, (0, 0, 0, rows - features.size(0))))


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              rows: int | None = None) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies; row i's positive is column i.

    (B, D) L2-normalised features and the scale exp(t). In a single process the negatives are the batch; under
    torch.distributed with several ranks, they are the batches of all ranks, and the returned value is this
    rank's share, weighted so that the mean over ranks is the loss of the global batch. `rows`: the most rows a
    rank's batch can hold (ranks may hold fewer: their padding is masked out); None: every rank holds B.
    """
    batch = image_features.size(0)
    if _world_size() == 1:
        logits = clip_logits(image_features, text_features, logit_scale)
        labels = torch.arange(batch, device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    rows = rows or batch
    real = _real_rows(batch, rows, image_features.device)
    all_images, all_texts = _gather_padded(image_features, rows), _gather_padded(text_features, rows)
    labels = torch.arange(batch, device=image_features.device) + dist.get_rank() * rows
    # padding columns get no probability: exp(-inf) = 0, so the loss and its gradients are those of the real ones
    image_to_text = clip_logits(image_features, all_texts, logit_scale).masked_fill(~real, float("-inf"))
    text_to_image = clip_logits(text_features, all_images, logit_scale).masked_fill(~real, float("-inf"))
    summed = (F.cross_entropy(image_to_text, labels, reduction="sum")
              + F.cross_entropy(text_to_image, labels, reduction="sum"))
    # DDP averages over ranks: this rank's sum over its rows, times world / global rows, averages to the global mean
    return summed / 2 * _world_size() / real.sum()


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """SigLIP's loss: every (image, caption) pair is a binary question, true on the diagonal alone.

    -sum of log sigmoid(+-(scale * cos + bias)) over all pairs, divided by the number of images, as open_clip's
    `SigLipLoss`. Under torch.distributed each rank scores its images against the captions of all ranks
    (gathered once, with gradient; not open_clip's rank-by-rank exchange), so every pair of the global batch is
    counted once, and the returned value is weighted so that the mean over ranks is the global-batch loss.
    `rows` as in `clip_loss`.
    """
    batch = image_features.size(0)
    if _world_size() == 1:
        texts, first, real = text_features, 0, None
    else:
        rows = rows or batch
        texts, real, first = (_gather_padded(text_features, rows), _real_rows(batch, rows, text_features.device),
                              dist.get_rank() * rows)
    logits = logit_scale * image_features @ texts.t() + logit_bias
    diagonal = torch.arange(batch, device=logits.device)
    signs = -torch.ones_like(logits)
    signs[diagonal, diagonal + first] = 1.0
    pairs = -F.logsigmoid(signs * logits)
    if real is None:
        return pairs.sum() / batch
    # DDP averages over ranks: this rank's real pairs, times world / global images, average to the global loss
    return pairs.masked_fill(~real, 0.0).sum() * _world_size() / real.sum()
