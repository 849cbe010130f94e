"""The symmetric InfoNCE loss of CLIP.

This is the one place where the batch's negatives are decided: today every rank scores its own
batch; the cross-rank version (gather the other ranks' features, offset the labels by rank) goes here.
"""
import torch
import torch.nn.functional as F


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D) L2-normalised, scalar scale -> (B, B) image->text logits; row i's positive is column i."""
    return logit_scale * image_features @ text_features.t()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over the batch similarity matrix."""
    logits = clip_logits(image_features, text_features, logit_scale)
    labels = torch.arange(logits.size(0), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
