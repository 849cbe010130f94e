"""Webdataset shards for evaluation: every (image, caption) pair exactly once, in a fixed order, by random access.

Being a map-style dataset, it is split across ranks by the distributed sampler, whose padding duplicates
validation drops by sample index; with a fixed order and one row per caption, the standard protocol (e.g.
5k COCO images with all their ~25k captions) comes out the same on any number of ranks and workers.
"""
from __future__ import annotations

import io
import logging
import tarfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image

from clipfromscratch.data.shards import is_remote, resolve_shard_urls, sample_captions, sample_image
from clipfromscratch.data.tsv import UNREADABLE
from clipfromscratch.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageMember:
    """Where an image's bytes are: shard file, offset, size."""

    url: str
    offset: int
    size: int


class IndexedShards(torch.utils.data.Dataset):
    """One row per caption of every readable sample of the shards, in shard order; an image's captions are adjacent."""

    def __init__(self, spec: str, transform: Callable[[Image.Image], torch.Tensor] | None):
        self.transform = transform
        self.images: list[ImageMember] = []
        self.rows: list[tuple[int, str]] = []  # (image number, caption)
        self.skipped = 0
        self._last: tuple[int, torch.Tensor | Image.Image] | None = None
        for url in resolve_shard_urls(spec):
            if is_remote(url):
                raise UsageError(f"evaluation shards must be local files (random access), got {url}")
            self._index(url)
        if not self.rows:
            raise UsageError(f"no usable samples in {spec}")

    def _index(self, url: str) -> None:
        members: dict[str, dict[str, tarfile.TarInfo]] = defaultdict(dict)
        try:
            with tarfile.open(url) as tar:  # reads the headers only, seeking over the data
                for member in tar:
                    if member.isfile():
                        key, ext = wds.tariterators.base_plus_ext(member.name)
                        if key is not None:
                            members[key][ext] = member
                texts = {key: {ext: tar.extractfile(m).read() for ext, m in found.items() if ext in ("json", "txt")}
                         for key, found in members.items()}
        except (tarfile.TarError, OSError) as exn:
            log.warning("skipping unreadable shard data in %s: %s", url, exn)
            return
        for key, found in members.items():
            image = sample_image(found)
            captions = sample_captions(texts[key])
            if image is None or not captions:
                self.skipped += 1
                log.warning("skipping sample %s in %s: %s", key, url, "no image" if image is None else "no caption")
                continue
            self.rows.extend((len(self.images), caption) for caption in captions)
            self.images.append(ImageMember(url, image.offset_data, image.size))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict | None:
        image_number, caption = self.rows[index]
        if self._last is None or self._last[0] != image_number:  # an image's captions come in a row: decode it once
            self._last = (image_number, self._load(image_number))
        pixels = self._last[1]
        if pixels is None:
            return None
        return {"pixels": pixels, "caption": caption, "image_id": image_number}

    def _load(self, image_number: int) -> torch.Tensor | Image.Image | None:
        member = self.images[image_number]
        with open(member.url, "rb") as f:  # opened per image: worker processes share no file offset
            f.seek(member.offset)
            data = f.read(member.size)
        try:
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
        except UNREADABLE as exn:
            self.skipped += 1
            log.warning("skipping unreadable image %d in %s: %s", image_number, member.url, exn)
            return None
        return self.transform(rgb) if self.transform else rgb
