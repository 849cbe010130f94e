"""What a sample is, and when one is left out: one rule for training, validation and evaluation.

A sample of webdataset shards is the tar members that share a KEY: an image KEY.jpg (or .jpeg, .png, .webp),
a caption KEY.txt and, optionally, KEY.json (the layout of data_prep/ and of img2dataset). A `captions` list in
KEY.json (COCO's five per image) replaces KEY.txt; a label is a KEY.json field, or a field of its `labels`
mapping, where data_prep writes Fashion's class columns. A sample is left out, counted by reason and logged
(the first of each reason), when it has no image, its KEY.json is not a JSON object, it has no caption (or,
where a label is read, not that label), or its image cannot be decoded; the checks run in that order and the
first that fails is the reason. Images of shards are decoded here, by one decoder, so every reader accepts the
same ones.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from clipfromscratch.errors import first_line

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "json")  # the members that captions and labels are read from
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # UnidentifiedImageError is an OSError
NO_IMAGE, MALFORMED_JSON, NO_CAPTION, NO_LABEL, UNREADABLE_IMAGE = (
    "no image", "malformed json", "no caption", "no label", "unreadable image")
SHOWN_PER_REASON = 1  # one example of each reason: a thousand broken images would print a thousand lines


class SkippedSample(Exception):
    """A sample left out for `reason`, one of the names above."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SkipCounts(Counter):
    """Samples left out, by reason, in this process (loader workers count in their own copy); the first
    SHOWN_PER_REASON of each reason are logged, then one line says that the rest are only counted."""

    def add(self, reason: str, what: str, detail: object = None) -> None:
        """Count one sample left out; `what` names it in the log ("sample KEY in URL"), `detail` says more."""
        self[reason] += 1
        if self[reason] <= SHOWN_PER_REASON:
            log.warning("skipping %s: %s", what, f"{reason} ({detail})" if detail else reason)
        elif self[reason] == SHOWN_PER_REASON + 1:
            log.warning("skipping more samples for %s: counted, not shown", reason)


@dataclass(frozen=True)
class Sample:
    """A sample that passed every check but the image's decoding."""

    image: Any  # the image member: its bytes, or the tar member that holds them
    captions: list[str]  # at least one, unless a label was asked for
    label: Any = None  # the value of the label asked for


def sample_image(members: dict):
    """A sample's image member (KEY.jpg, .jpeg, .png or .webp), None if it has none."""
    return next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)


def sample_meta(members: dict) -> dict:
    """KEY.json as a dict ({} without one); raises SkippedSample when it is not a JSON object."""
    if "json" not in members:
        return {}
    try:
        meta = json.loads(members["json"])
    except ValueError:  # UnicodeDecodeError is a ValueError too
        raise SkippedSample(MALFORMED_JSON) from None
    if not isinstance(meta, dict):
        raise SkippedSample(MALFORMED_JSON)
    return meta


def sample_captions(members: dict) -> list[str]:
    """All captions of a sample: KEY.json's `captions` list if it has one, else KEY.txt; [] if it has none.

    Raises SkippedSample when KEY.json is malformed, as `parse_sample` would.
    """
    return _captions(members, sample_meta(members))


def _captions(members: dict, meta: dict) -> list[str]:
    captions = meta.get("captions")
    if isinstance(captions, list) and captions:
        return [str(c).strip() for c in captions if str(c).strip()]
    text = members.get("txt", b"").decode("utf-8", errors="replace").strip()
    return [text] if text else []


def sample_label(meta: dict, name: str):
    """KEY.json's field `name`, or its `labels` mapping's; None if neither has it."""
    labels = meta.get("labels")
    return meta.get(name, labels.get(name) if isinstance(labels, dict) else None)


def parse_sample(members: dict, label: str | None = None) -> Sample:
    """A sample from its members by extension (bytes; the image's may be a tar member), or SkippedSample.

    It needs an image and, without `label`, a caption; with `label`, that label instead of a caption.
    """
    image = sample_image(members)
    if image is None:
        raise SkippedSample(NO_IMAGE)
    meta = sample_meta(members)
    captions = _captions(members, meta)
    if label is None:
        if not captions:
            raise SkippedSample(NO_CAPTION)
        return Sample(image, captions)
    value = sample_label(meta, label)
    if value is None:
        raise SkippedSample(NO_LABEL)
    return Sample(image, captions, value)


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> (3, H, W) uint8 RGB; raises ValueError when they cannot be decoded.

    torchvision's decoder gives the pixels PIL would, without a PIL image in between.
    """
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exn:  # torchvision's decoders raise RuntimeError for any corrupt input
        # its first line starts with the C++ function and source line: "decode_jpeg, .../decode_jpeg.cpp:171, "
        raise ValueError(re.sub(r"^\w+, \S+:\d+, ", "", first_line(exn, None))) from None


def read_sample(raw: dict, skipped: SkipCounts, label: str | None = None) -> tuple[Sample, torch.Tensor] | None:
    """A streamed sample (webdataset's dict: `__key__`, `__url__`, bytes by extension) and its decoded pixels;
    None, counted in `skipped`, when it is left out."""
    what = f"sample {raw['__key__']} in {raw['__url__']}"
    try:
        sample = parse_sample(raw, label)
    except SkippedSample as skip:
        skipped.add(skip.reason, what)
        return None
    try:
        return sample, decode_rgb(sample.image)
    except UNREADABLE as exn:
        skipped.add(UNREADABLE_IMAGE, what, exn)
        return None


def open_rgb(path: str) -> Image.Image:
    """An image file as an RGB PIL image, by PIL (any format it reads); raises one of UNREADABLE."""
    with Image.open(path) as image:
        return image.convert("RGB")
