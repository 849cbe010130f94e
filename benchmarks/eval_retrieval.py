"""Retrieval Recall@1/5/10 at COCO scale: 5,000 images x 25,000 captions (5 per image), 512-d unit embeddings.

Each variant runs in a fresh process so its peak memory is its own: `chunked` is the evaluation code
(similarities computed CHUNK query rows at a time), `full` the same code with one block holding the whole
matrix. Peak memory is the process's peak RSS minus its RSS once the embeddings exist. Time is the median
of the rounds after a warm-up. Prints one JSON line.

    python benchmarks/eval_retrieval.py [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from clipfromscratch.eval import retrieval

IMAGES, CAPTIONS_PER_IMAGE, DIM = 5000, 5, 512


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_variant(variant: str, rounds: int) -> dict:
    if variant == "full":
        retrieval.CHUNK = IMAGES * CAPTIONS_PER_IMAGE  # one block: the whole similarity matrix at once
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(IMAGES, DIM, generator=generator), dim=-1)
    text_to_image = torch.arange(IMAGES).repeat_interleave(CAPTIONS_PER_IMAGE)
    noise = torch.randn(len(text_to_image), DIM, generator=generator)
    texts = torch.nn.functional.normalize(images[text_to_image] + 1.5 * noise, dim=-1)
    del noise
    baseline = rss_mib()
    metrics = retrieval.retrieval_recall(images, texts, text_to_image)  # also the warm-up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        retrieval.retrieval_recall(images, texts, text_to_image)
        seconds.append(time.perf_counter() - start)
    return {"seconds": round(statistics.median(seconds), 3), "peak_mib_beyond_embeddings": round(peak, 1),
            "embeddings_mib": round((images.numel() + texts.numel()) * 4 / 2**20, 1),
            "text_retrieval_recall@1": round(metrics["text_retrieval_recall@1"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=("chunked", "full"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.rounds)))
        return
    results = {"images": IMAGES, "captions": IMAGES * CAPTIONS_PER_IMAGE, "dim": DIM, "threads": args.threads,
               "chunk_rows": retrieval.CHUNK}
    for variant in ("chunked", "full"):
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--rounds", str(args.rounds),
                                "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
