"""Webdataset shards for evaluation: every (image, caption) pair exactly once, in a fixed order, by random access.

Being a map-style dataset, it is split across ranks by the distributed sampler, whose padding duplicates
validation drops by sample index; with a fixed order and one row per caption, the standard protocol (e.g.
5k COCO images with all their ~25k captions) comes out the same on any number of ranks and workers.
"""
from __future__ import annotations

import logging
import tarfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.functional import to_pil_image

from clipfromscratch.data.samples import (
    TEXT_EXTENSIONS,
    UNREADABLE,
    UNREADABLE_IMAGE,
    SkipCounts,
    SkippedSample,
    decode_rgb,
    parse_sample,
)
from clipfromscratch.data.shards import is_remote, resolve_shard_urls
from clipfromscratch.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageMember:
    """Where an image's bytes are: shard file, offset, size; and the sample's key, for the log."""

    url: str
    key: str
    offset: int
    size: int


class IndexedShards(torch.utils.data.Dataset):
    """One row per caption of every readable sample of the shards, in shard order; an image's captions are adjacent.

    Samples are checked by samples.py's rule when indexed, but for the image, which is decoded when read: an
    image that cannot be decoded then gives None, counted in `skipped` by the process that read it.
    """

    def __init__(self, spec: str, transform: Callable[[Image.Image], torch.Tensor] | None):
        self.transform = transform
        self.images: list[ImageMember] = []
        self.rows: list[tuple[int, str]] = []  # (image number, caption)
        self.skipped = SkipCounts()
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
                texts = {key: {ext: tar.extractfile(m).read() for ext, m in found.items() if ext in TEXT_EXTENSIONS}
                         for key, found in members.items()}
        except (tarfile.TarError, OSError) as exn:
            log.warning("skipping unreadable shard data in %s: %s", url, exn)
            return
        for key, found in members.items():
            try:
                sample = parse_sample({**found, **texts[key]})  # the image stays a tar member, read when needed
            except SkippedSample as skip:
                self.skipped.add(skip.reason, f"sample {key} in {url}")
                continue
            self.rows.extend((len(self.images), caption) for caption in sample.captions)
            self.images.append(ImageMember(url, key, sample.image.offset_data, sample.image.size))

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
            rgb = to_pil_image(decode_rgb(data))
        except UNREADABLE as exn:
            self.skipped.add(UNREADABLE_IMAGE, f"sample {member.key} in {member.url}", exn)
            return None
        return self.transform(rgb) if self.transform else rgb
