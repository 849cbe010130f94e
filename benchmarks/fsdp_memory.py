"""Bytes a rank holds for the weights, gradients and AdamW state of a tower pair, under DDP and FSDP.

    python benchmarks/fsdp_memory.py

Parameters are counted on the meta device (no memory, no download); 16 bytes per parameter: the fp32 weight, its
gradient and AdamW's two moments (bf16 autocast keeps fp32 master weights). Activations are not counted. The
per-rank figures of FSDP are checked against live tensors at 2 ranks by tests/test_fsdp.py.
"""
import argparse
import json

import timm
import torch
from transformers import AutoModel

from clipfromscratch.encoders.image import timm_arguments
from clipfromscratch.encoders.text import text_config

BYTES_PER_PARAMETER = 16
BERT_VOCABULARY = 30522  # bert-base-uncased's
PAIRS = {  # name -> (image tower, image size, embed_dim), each with the base BERT
    "base": ("vit", 224, 512),
    "large_fsdp": ("vit_large_patch14_clip_224", 224, 768),
}


def parameters(image_encoder: str, image_size: int, embed_dim: int) -> int:
    """Both towers, both linear heads and the learned scale."""
    name, kwargs = timm_arguments(image_encoder, "base", image_size)
    with torch.device("meta"):
        image = timm.create_model(name, num_classes=0, **kwargs)
        text = AutoModel.from_config(text_config("bert", "base", {}, BERT_VOCABULARY, {}), add_pooling_layer=False)
    towers = sum(p.numel() for module in (image, text) for p in module.parameters())
    return towers + embed_dim * (image.num_features + text.config.hidden_size) + 1


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    for name, pair in PAIRS.items():
        count = parameters(*pair)
        whole = count * BYTES_PER_PARAMETER
        print(json.dumps({"pair": name, "parameters_m": round(count / 1e6, 1), "ddp_bytes_per_rank": whole,
                          **{f"fsdp_{n}_ranks_bytes_per_rank": whole // n for n in (8, 64)}}))


if __name__ == "__main__":
    main()
