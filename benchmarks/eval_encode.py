"""Encoding throughput for evaluation (images/s): our ViT and ResNet image towers at tiny and base size.

What `clipfromscratch eval` does per batch: `encode_image` (tower + head + L2 norm) under inference mode,
batched, fp32 on the CPU, random weights (speed does not depend on them). Preprocessing is left out: it is
the data loader's cost, measured by benchmarks/loader_throughput.py. Median of the rounds after a warm-up
batch. Prints one JSON line.

    python benchmarks/eval_encode.py [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from clipfromscratch.config import ModelConfig
from clipfromscratch.model import build_model
from clipfromscratch.text_tokenizers import make_tokenizer

# (tower, size) -> batch size: the base towers at 224+ px get smaller batches so a round stays short
TOWERS = {("vit", "tiny"): 256, ("resnet", "tiny"): 256, ("vit", "base"): 32, ("resnet", "base"): 32}
CAPTIONS = ["a small red circle on the left", "a blue square above a green triangle"] * 50


@torch.inference_mode()
def images_per_second(image_encoder: str, size: str, batch: int, rounds: int) -> dict:
    config = ModelConfig(image_encoder=image_encoder, text_encoder="bert", model_size=size, embed_dim=512)
    model = build_model(config, make_tokenizer("bert", False, size, CAPTIONS))
    model.eval()
    side = model.config.image_size
    pixels = torch.randn(batch, 3, side, side)
    model.encode_image(pixels)  # warm-up: the first pass in a process is slow
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        model.encode_image(pixels)
        seconds.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.image_tower.parameters()) / 1e6
    return {"image_size": side, "batch": batch, "tower_params_m": round(params, 1),
            "images_per_s": round(batch / statistics.median(seconds), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "dtype": "float32"}
    for (tower, size), batch in TOWERS.items():
        results[f"{tower}-{size}"] = images_per_second(tower, size, batch, args.rounds)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
