"""Text-to-image search in a folder: a ranked list and a contact sheet, the folder's embeddings cached on disk.

The cache holds one file per (model, folder) with each image's path, modification time and embedding; the
next query re-encodes only images that are new or changed since.
"""
from __future__ import annotations

import hashlib
import math
import os

import torch
from PIL import Image, ImageDraw

from clipfromscratch.data.samples import IMAGE_EXTENSIONS, open_rgb
from clipfromscratch.errors import UsageError
from clipfromscratch.eval.data import ImageFiles
from clipfromscratch.eval.embed import encode_images, encode_texts
from clipfromscratch.eval.models import EvalModel

IMAGE_SUFFIXES = tuple(f".{ext}" for ext in (*IMAGE_EXTENSIONS, "bmp", "gif"))  # a folder may hold what PIL reads
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "clipfromscratch", "search")
THUMBNAIL = 192
CAPTION_HEIGHT = 18


def list_images(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise UsageError(f"image folder not found: {directory}")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(directory) for name in names
                   if name.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return paths


def cache_file(model: EvalModel, directory: str, cache_dir: str) -> str:
    key = f"{model.name}\n{model.weights_mtime}\n{os.path.abspath(directory)}"
    return os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:24] + ".pt")


def folder_embeddings(model: EvalModel, directory: str, cache_dir: str = DEFAULT_CACHE_DIR, batch_size: int = 64,
                      num_workers: int = 0) -> tuple[list[str], torch.Tensor]:
    """Paths of the folder's readable images and their (N, D) embeddings, encoding only what the cache lacks."""
    paths = list_images(directory)
    mtimes = {p: os.path.getmtime(p) for p in paths}
    cache_path = cache_file(model, directory, cache_dir)
    cached = torch.load(cache_path) if os.path.isfile(cache_path) else {"paths": [], "mtimes": [], "features": None}
    known = {p: (t, cached["features"][i]) for i, (p, t) in enumerate(zip(cached["paths"], cached["mtimes"]))}
    stale = [p for p in paths if p not in known or known[p][0] != mtimes[p]]
    if stale:
        try:
            features, encoded = encode_images(model, ImageFiles(stale, stale), batch_size, num_workers)
        except UsageError:  # every new or changed file is unreadable: the cached ones still answer
            features, encoded = [], []
        known.update({p: (mtimes[p], f) for p, f in zip(encoded, features)})
    kept = [p for p in paths if p in known and known[p][0] == mtimes[p]]
    if not kept:
        raise UsageError(f"no readable images in {directory}")
    if stale or len(kept) != len(cached["paths"]):
        os.makedirs(cache_dir, exist_ok=True)
        torch.save({"paths": kept, "mtimes": [mtimes[p] for p in kept],
                    "features": torch.stack([known[p][1] for p in kept])}, cache_path)
    return kept, torch.stack([known[p][1] for p in kept])


def search(model: EvalModel, directory: str, query: str, k: int = 9, cache_dir: str = DEFAULT_CACHE_DIR,
           batch_size: int = 64, num_workers: int = 0) -> list[dict]:
    """The k images most similar to `query`, best first: [{"rank", "path", "score" (cosine)}]."""
    if k < 1:
        raise UsageError(f"-k must be at least 1, got {k}")
    paths, features = folder_embeddings(model, directory, cache_dir, batch_size, num_workers)
    scores = features @ encode_texts(model, [query])[0]
    top = scores.topk(min(k, len(paths)))
    return [{"rank": rank + 1, "path": paths[i], "score": round(s, 4)}
            for rank, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))]


def contact_sheet(hits: list[dict], query: str, path: str) -> None:
    """The hits as a grid of thumbnails, each captioned with its rank and score, the query on top."""
    columns = math.ceil(math.sqrt(len(hits)))
    rows = math.ceil(len(hits) / columns)
    cell = THUMBNAIL + CAPTION_HEIGHT
    sheet = Image.new("RGB", (columns * THUMBNAIL, CAPTION_HEIGHT + rows * cell), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), query, fill="black")
    for n, hit in enumerate(hits):
        x, y = (n % columns) * THUMBNAIL, CAPTION_HEIGHT + (n // columns) * cell
        thumbnail = open_rgb(hit["path"])
        thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
        sheet.paste(thumbnail, (x + (THUMBNAIL - thumbnail.width) // 2, y + (THUMBNAIL - thumbnail.height) // 2))
        draw.text((x + 4, y + THUMBNAIL + 2), f"#{hit['rank']}  {hit['score']:.3f}  {os.path.basename(hit['path'])}",
                  fill="black")
    sheet.save(path)
