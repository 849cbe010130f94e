"""clipfromscratch: train CLIP-style image-text models from scratch, evaluate them, compare them."""
from clipfromscratch.export import load_model
from clipfromscratch.loss import clip_loss

__all__ = ["clip_loss", "load_model"]
