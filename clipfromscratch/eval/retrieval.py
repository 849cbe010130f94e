"""Retrieval Recall@k between images and captions, with any number of captions per image.

Keys follow CLIP_benchmark: `image_retrieval_recall@k` has captions as queries and images retrieved;
`text_retrieval_recall@k` has images as queries, a hit being any of the image's captions in the top k.
"""
from __future__ import annotations

import torch

CHUNK = 1024  # query rows per similarity block: memory O(CHUNK x N) instead of O(N x N)


def _hits_at_k(queries: torch.Tensor, keys: torch.Tensor, is_match, k_max: int) -> torch.Tensor:
    """(Q, k_max) bool: whether the j-th best key of each query is a correct one."""
    rows = []
    for start in range(0, queries.size(0), CHUNK):
        top = (queries[start:start + CHUNK] @ keys.t()).topk(min(k_max, keys.size(0)), dim=1).indices
        rows.append(is_match(torch.arange(start, start + top.size(0), device=top.device), top))
    return torch.cat(rows)


def first_occurrences(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) keys -> (K,) row of each distinct key's first occurrence (keys sorted), (N,) each row's key number."""
    _, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), keys.numel(), device=keys.device)
    first.scatter_reduce_(0, inverse, torch.arange(keys.numel(), device=keys.device), reduce="amin")
    return first, inverse


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """(I, D) images, (T, D) captions, (T,) index of each caption's image -> recall fractions in [0, 1]."""
    k_max = max(ks)
    # caption -> image: one correct image per caption
    t2i = _hits_at_k(text_features, image_features, lambda q, top: top == text_to_image[q, None], k_max)
    # image -> caption: correct when the retrieved caption belongs to the query image
    i2t = _hits_at_k(image_features, text_features, lambda q, top: text_to_image[top] == q[:, None], k_max)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = t2i[:, :k].any(1).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = i2t[:, :k].any(1).float().mean().item()
    return metrics
