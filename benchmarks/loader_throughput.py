"""Images/s per CPU core: the shard loader (decode + augment + tokenise, 224 px) against a plain ImageFolder loader.

Generates its own COCO-sized photos (640x480 crops of scikit-learn's two sample photos, JPEG quality 90),
prepares them into shards with data_prep's machinery (timed: images/s per worker), then reads both ways in
the same process with one thread and no loader workers, counting images per CPU second of the process
(per core, whatever else runs on the machine) and per wall-clock second. Rounds alternate between the
two loaders and the median round counts. Prints one JSON line.

    python benchmarks/loader_throughput.py [--images 300] [--rounds 3] [--max-size 384]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from clipfromscratch.config import DataConfig
from clipfromscratch.data.datamodule import Collate
from clipfromscratch.data.shards import CaptionShards
from clipfromscratch.data.transforms import TRAIN_SCALE, RandomResizedCropNormalize
from clipfromscratch.prep import captioned, writer
from clipfromscratch.text_tokenizers import make_tokenizer

SIZE = 224
BATCH = 64
MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)  # CLIP's
CLASSES = ("temple", "flower", "street", "garden")


def make_photos(root: str, count: int, seed: int = 0) -> str:
    """`count` 640x480 (or 480x640) JPEGs in ImageFolder layout, and a caption table over them; returns the table."""
    rng = np.random.default_rng(seed)
    sources = load_sample_images().images  # two 427x640 photos
    lines = ["filepath\tcaption"]
    for n in range(count):
        source = sources[n % 2]
        h, w = source.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = source[y:y + ch, x:x + cw] * rng.uniform(0.8, 1.2, size=3)
        image = Image.fromarray(crop.clip(0, 255).astype(np.uint8))
        image = image.resize((640, 480) if rng.random() < 0.7 else (480, 640), Image.Resampling.BICUBIC)
        label = CLASSES[n % len(CLASSES)]
        os.makedirs(os.path.join(root, "photos", label), exist_ok=True)
        path = os.path.join("photos", label, f"{n:06d}.jpg")
        image.save(os.path.join(root, path), quality=90)
        lines.append(f"{path}\ta photo of a {label}, number {n}")
    table = os.path.join(root, "captions.tsv")
    with open(table, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return table


def images_per_s(loader: DataLoader) -> tuple[float, float]:
    """(images per CPU second of this process, images per wall-clock second): on a shared machine the first is
    the per-core figure, the second also counts time other processes took the core."""
    cpu, wall, seen = time.process_time(), time.perf_counter(), 0
    for batch in loader:
        seen += batch["pixels"].size(0)
    return seen / (time.process_time() - cpu), seen / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-size", type=int, default=384, help="data_prep's --max-size for the shards")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        table = make_photos(root, args.images)
        splits, _ = captioned.table_splits(table, "train", "filepath", "caption", None)
        # one worker process: its CPU time is the children's, counted once the pool has ended
        children = os.times().children_user + os.times().children_system
        report = writer.prepare_split("train", splits["train"], os.path.join(root, "shards"), shard_size=100,
                                    max_size=args.max_size, workers=1, source={})
        prep_cpu = os.times().children_user + os.times().children_system - children

        shards = CaptionShards(os.path.join(root, "shards"), RandomResizedCropNormalize(SIZE, MEAN, STD), shuffle=True,
                               shuffle_buffer=DataConfig.shuffle_buffer)
        tokenizer = make_tokenizer("bert", False, "tiny", shards.captions())
        collate = Collate(tokenizer, 77)

        def folder_collate(samples: list) -> dict:
            return collate([{"pixels": pixels, "caption": f"a photo of a {CLASSES[label]}", "image_id": 0}
                            for pixels, label in samples])

        # torchvision's classic pipeline on the original files, with the same crop range and the same tokenisation
        folder = datasets.ImageFolder(os.path.join(root, "photos"), T.Compose([
            T.RandomResizedCrop(SIZE, scale=TRAIN_SCALE, interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(), T.Normalize(MEAN, STD)]))
        loaders = {"shards": DataLoader(shards, batch_size=BATCH, collate_fn=collate),
                   "imagefolder": DataLoader(folder, batch_size=BATCH, shuffle=True, collate_fn=folder_collate)}
        for loader in loaders.values():  # warm-up: first-call costs, file cache
            images_per_s(loader)
        rates = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                rates[name].append(images_per_s(loader))
        original_kb = sum(os.path.getsize(p) for p, _ in folder.samples) / len(folder.samples) / 1024
        shard_kb = report.stats["bytes"] / report.stats["images"] / 1024
    cpu = {name: statistics.median(cpu for cpu, _ in values) for name, values in rates.items()}
    wall = {name: statistics.median(wall for _, wall in values) for name, values in rates.items()}
    print(json.dumps({
        "images": args.images, "max_size": args.max_size, "image_size": SIZE, "batch_size": BATCH, "threads": 1,
        "rounds": args.rounds, "shard_loader_images_per_cpu_s": round(cpu["shards"]),
        "imagefolder_images_per_cpu_s": round(cpu["imagefolder"]),
        "speedup": round(cpu["shards"] / cpu["imagefolder"], 2),
        "shard_loader_images_per_wall_s": round(wall["shards"]),
        "imagefolder_images_per_wall_s": round(wall["imagefolder"]),
        "prep_images_per_cpu_s_per_worker": round(report.stats["images"] / prep_cpu, 1),
        "original_kb_per_image": round(original_kb, 1), "shard_kb_per_image": round(shard_kb, 1),
        "load_average": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
