"""Webdataset shards in img2dataset layout: KEY.jpg (or .jpeg/.png/.webp) + KEY.txt caption (+ optional KEY.json)."""
from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import random
from collections.abc import Callable, Iterator

import braceexpand
import torch
import webdataset as wds
from PIL import Image

from clipfromscratch.data.tsv import UNREADABLE
from clipfromscratch.errors import UsageError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def resolve_shard_urls(spec: str) -> list[str]:
    """The shards a SPEC names: a .tar file, a directory of .tar files, a brace pattern, or a `::` list of these."""
    urls = []
    for url in (url for part in spec.split("::") for url in braceexpand.braceexpand(part)):
        if os.path.isdir(url):
            found = sorted(glob.glob(os.path.join(glob.escape(url), "*.tar")))
            if not found:
                raise UsageError(f"no .tar shards found in {url}")
            urls.extend(found)
        else:
            urls.append(url)
    missing = [url for url in urls if not _is_remote(url) and not os.path.isfile(url)]
    if len(missing) == 1:
        raise UsageError(f"shard not found: {missing[0]}")
    if missing:
        raise UsageError(f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} shards missing)")
    return urls


def _image_id(url: str, key: str) -> int:
    digest = hashlib.blake2b(f"{url}\n{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits, so it fits a signed int64 tensor


class CaptionShards(torch.utils.data.IterableDataset):
    """Image-caption samples streamed from shards, split across DDP ranks and then across loader workers."""

    def __init__(self, spec: str, transform: Callable[[Image.Image], torch.Tensor] | None, shuffle: bool,
                 seed: int = 0):
        super().__init__()
        self.urls = resolve_shard_urls(spec)
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.skipped = 0  # corrupt samples skipped, in this process
        self._passes = 0

    def __iter__(self) -> Iterator[dict]:
        # A new order every pass; counted per process, which advances in step with epochs in the main
        # process and in persistent workers (non-persistent workers get a fresh copy and repeat pass 0).
        pass_seed = f"{self.seed}/{self._passes}"
        self._passes += 1
        urls = list(self.urls)
        if self.shuffle:
            # the same shard order on every rank, so splitting it by node below still partitions it
            random.Random(pass_seed).shuffle(urls)
        urls = wds.split_by_worker(wds.split_by_node(urls))
        samples = wds.tarfile_samples(({"url": url} for url in urls), handler=self._shard_error)
        if self.shuffle:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            samples = wds.shuffle(SHUFFLE_BUFFER, seed=f"{pass_seed}/{rank}/{worker}")(samples)
        for raw in samples:
            sample = self._sample(raw)
            if sample is not None:
                yield sample

    def captions(self) -> Iterator[str]:
        """Every caption in shard order, streamed; only the .txt members are read."""
        shards = ({"url": url} for url in self.urls)
        for raw in wds.tarfile_samples(shards, handler=self._shard_error,
                                       select_files=lambda name: name.endswith(".txt")):
            caption = _caption(raw)
            if caption:
                yield caption

    def _sample(self, raw: dict) -> dict | None:
        image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        caption = _caption(raw)
        if image_bytes is None:
            return self._skip(raw, "no image")
        if not caption:
            return self._skip(raw, "no caption")
        try:
            with Image.open(io.BytesIO(image_bytes)) as image:
                rgb = image.convert("RGB")
        except UNREADABLE as exn:
            return self._skip(raw, f"unreadable image ({exn})")
        return {"pixels": self.transform(rgb) if self.transform else rgb, "caption": caption,
                "image_id": _image_id(raw["__url__"], raw["__key__"])}

    def _skip(self, raw: dict, reason: str) -> None:
        self.skipped += 1
        log.warning("skipping sample %s in %s: %s", raw["__key__"], raw["__url__"], reason)

    def _shard_error(self, exn: Exception) -> bool:
        """webdataset's error handler for shards that can't be opened or read: warn and go on with the rest."""
        where = "; ".join(arg for arg in exn.args if isinstance(arg, str))
        log.warning("skipping unreadable shard data: %s: %s", type(exn).__name__, where)
        return True


def _caption(raw: dict) -> str:
    return raw.get("txt", b"").decode("utf-8", errors="replace").strip()
