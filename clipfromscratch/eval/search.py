"""Text-to-image search in a folder: a ranked list and a contact sheet, the folder's embeddings cached on disk.

The cache holds one file per (model, folder) with each image's path, modification time and embedding; the
next query re-encodes only images that are new or changed since. The cache is derived data: a damaged one is
rebuilt, and one that cannot be written costs a warning, never the answer.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from clipfromscratch.config import opt
from clipfromscratch.data.samples import IMAGE_EXTENSIONS, open_rgb
from clipfromscratch.errors import UsageError, first_line
from clipfromscratch.eval.data import ImageFiles
from clipfromscratch.eval.embed import encode_images, encode_texts
from clipfromscratch.eval.models import EvalModel
from clipfromscratch.outputs import check_output_file, write_file_atomic

log = logging.getLogger(__name__)

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


@dataclass
class SearchOptions:
    """What `search` reads besides the model, the folder and the query: flags made and checked by
    clipfromscratch.config."""

    k: int = opt(9, "how many images to return", at_least=1)
    sheet: str = opt("search.png", "contact sheet of the top k (PNG, JPEG, ...: by its suffix)")
    cache_dir: str = opt(DEFAULT_CACHE_DIR, "where the folder's embeddings are kept")


def check_query(query: str) -> None:
    """A query with words in it, else a one-line UsageError."""
    if not query.strip():
        raise UsageError("--query is empty: give the words to search for")


def check_sheet(path: str) -> None:
    """The contact sheet can be written at `path`, in a format PIL knows by its suffix; checked before the search."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in Image.registered_extensions():
        raise UsageError(f"--sheet {path}: give an image file name (.png, .jpg), not '{suffix or 'no suffix'}'")
    check_output_file(path, "--sheet")


def cache_file(model: EvalModel, directory: str, cache_dir: str) -> str:
    key = f"{model.name}\n{model.weights_mtime}\n{os.path.abspath(directory)}"
    return os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:24] + ".pt")


EMPTY_CACHE = {"paths": [], "mtimes": [], "features": None}


def _read_cache(path: str) -> dict:
    """The cached paths, mtimes and (N, D) features; empty when there is no cache, or with one warning when it
    cannot be read (it is then rebuilt)."""
    if not os.path.isfile(path):
        return EMPTY_CACHE
    try:
        cached = torch.load(path, weights_only=True)  # paths, times and a tensor: nothing that needs pickled code
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        log.warning("search cache %s cannot be read (%s): encoding the folder again", path, first_line(err))
        return EMPTY_CACHE
    try:
        paths, mtimes, features = cached["paths"], cached["mtimes"], cached["features"]
        whole = features.dim() == 2 and len(paths) == len(mtimes) == len(features)
    except (TypeError, KeyError, AttributeError):
        whole = False
    if not whole:
        log.warning("search cache %s is not one this version wrote: encoding the folder again", path)
        return EMPTY_CACHE
    return cached


def _write_cache(path: str, cache: dict) -> None:
    try:
        write_file_atomic(path, lambda partial: torch.save(cache, partial))
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        log.warning("cannot write the search cache %s (%s): the next search encodes the folder again", path,
                    first_line(err))


def folder_embeddings(model: EvalModel, directory: str, cache_dir: str = DEFAULT_CACHE_DIR, batch_size: int = 64,
                      num_workers: int = 0) -> tuple[list[str], torch.Tensor]:
    """Paths of the folder's readable images and their (N, D) embeddings, encoding only what the cache lacks."""
    paths = list_images(directory)
    mtimes = {p: os.path.getmtime(p) for p in paths}
    cache_path = cache_file(model, directory, cache_dir)
    cached = _read_cache(cache_path)
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
        raise UsageError(f"no readable images in {directory}: none of its {len(paths)} image files can be opened")
    features = torch.stack([known[p][1] for p in kept])
    if stale or len(kept) != len(cached["paths"]):
        _write_cache(cache_path, {"paths": kept, "mtimes": [mtimes[p] for p in kept], "features": features})
    return kept, features


def search(model: EvalModel, directory: str, query: str, k: int = 9, cache_dir: str = DEFAULT_CACHE_DIR,
           batch_size: int = 64, num_workers: int = 0) -> list[dict]:
    """The k images most similar to `query`, best first: [{"rank", "path", "score" (cosine)}]."""
    check_query(query)
    if k < 1:  # the command's -k is checked with its flag; a caller of this function may pass anything
        raise UsageError(f"k is {k}: ask for at least 1 image")
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
