"""The embedded default data: coloured shapes with captions, rendered on the fly, deterministic by seed.

Each sample is one object, or two objects in a spatial relation; its caption names colours, shapes,
sizes and places in varied wording. Single-object samples carry colour and shape labels for
zero-shot checks (two-object samples carry -1: their class is ambiguous).
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "pink": (240, 120, 190), "brown": (120, 75, 35),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES = {"small": 0.13, "medium": 0.18, "large": 0.24}  # radius as a fraction of the image side
PLACES = {  # centre (x, y) as fractions, and how captions name it
    (0.25, 0.25): "in the top left", (0.5, 0.25): "at the top", (0.75, 0.25): "in the top right",
    (0.25, 0.5): "on the left", (0.5, 0.5): "in the middle", (0.75, 0.5): "on the right",
    (0.25, 0.75): "in the bottom left", (0.5, 0.75): "at the bottom", (0.75, 0.75): "in the bottom right",
}
# relation -> (offset of the first object from the second, wordings, the inverse relation)
RELATIONS = {
    "left": ((-1, 0), ("to the left of", "left of"), "right"),
    "right": ((1, 0), ("to the right of", "right of"), "left"),
    "above": ((0, -1), ("above", "over"), "below"),
    "below": ((0, 1), ("below", "under"), "above"),
}
TWO_OBJECT_FRACTION = 0.3
SPLIT_STREAMS = {"train": 0, "val": 1}  # disjoint seed streams per split
CAPTIONS_FOR_TOKENIZER = 20_000


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str
    x: float
    y: float
    rgb: tuple[int, int, int]


def _thing(rng: np.random.Generator, x: float, y: float, max_size: str | None = None) -> Thing:
    colour = str(rng.choice(list(COLOURS)))
    sizes = list(SIZES)[: list(SIZES).index(max_size) + 1] if max_size else list(SIZES)
    # a little colour jitter so colour is a category, not a single pixel value
    rgb = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
    return Thing(colour, str(rng.choice(SHAPES)), str(rng.choice(sizes)), x, y, rgb)


def _scene(rng: np.random.Generator) -> tuple[list[Thing], str | None]:
    """One object at one of nine places, or two objects with the first left/right/above/below the second."""
    jitter = lambda: float(rng.uniform(-0.05, 0.05))  # noqa: E731
    if rng.random() >= TWO_OBJECT_FRACTION:
        x, y = list(PLACES)[rng.integers(len(PLACES))]
        return [_thing(rng, x + jitter(), y + jitter())], None
    relation = str(rng.choice(list(RELATIONS)))
    (dx, dy), _, _ = RELATIONS[relation]
    cx, cy = 0.5 + jitter(), 0.5 + jitter()
    first = _thing(rng, cx + 0.25 * dx, cy + 0.25 * dy, max_size="medium")
    second = _thing(rng, cx - 0.25 * dx, cy - 0.25 * dy, max_size="medium")
    return [first, second], relation


def _place_words(thing: Thing) -> str:
    nearest = min(PLACES, key=lambda p: (p[0] - thing.x) ** 2 + (p[1] - thing.y) ** 2)
    return PLACES[nearest]


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _caption(things: list[Thing], relation: str | None, rng: np.random.Generator) -> str:
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    if relation is None:
        t = things[0]
        where = _place_words(t)
        return pick([
            f"{_a(t.size)} {t.colour} {t.shape} {where}",
            f"there is {_a(t.colour)} {t.shape} {where}",
            f"{where}, {_a(t.size)} {t.colour} {t.shape}",
            f"{_a(t.colour)} {t.shape}",
            f"one {t.size} {t.colour} {t.shape}",
            f"a picture of {_a(t.colour)} {t.shape} {where}",
        ])
    a, b = things
    if rng.random() < 0.5:  # say it the other way round
        a, b, relation = b, a, RELATIONS[relation][2]
    words = pick(RELATIONS[relation][1])
    return pick([
        f"{_a(a.colour)} {a.shape} {words} {_a(b.colour)} {b.shape}",
        f"{_a(a.size)} {a.colour} {a.shape} {words} {_a(b.size)} {b.colour} {b.shape}",
        f"there is {_a(a.colour)} {a.shape} {words} {_a(b.colour)} {b.shape}",
    ])


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, side: int) -> None:
    cx, cy, r = thing.x * side, thing.y * side, SIZES[thing.size] * side
    if thing.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=thing.rgb)
    elif thing.shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=thing.rgb)
    elif thing.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=thing.rgb)
    elif thing.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=thing.rgb)
    elif thing.shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=thing.rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=thing.rgb)
    else:  # star: five points, inner radius 0.45
        points = [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(points, fill=thing.rgb)


def render(things: list[Thing], side: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene on a light grey background with a faint random tint."""
    background = tuple(int(v) for v in rng.integers(200, 236, size=3))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    for thing in things:
        _draw(draw, thing, side)
    return image


class SyntheticCaptions(torch.utils.data.Dataset):
    """`num_samples` rendered image-caption pairs; sample i of a split is the same for every run with `seed`."""

    zeroshot_tasks = {
        # prompt ensembles: every class name in the wordings of the captions, averaged over the other attribute
        "colour": (list(COLOURS), [lambda c, s=shape: f"{_a(c)} {s}" for shape in SHAPES]),
        "shape": (list(SHAPES), [lambda s, c=colour: f"{_a(c)} {s}" for colour in COLOURS]),
    }

    def __init__(self, split: str, num_samples: int, seed: int, image_size: int,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None):
        self.stream = SPLIT_STREAMS[split]
        self.num_samples = num_samples
        self.seed = seed
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, index])

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        things, relation = _scene(rng)
        caption = _caption(things, relation, rng)
        image = render(things, self.image_size, rng)
        single = relation is None
        return {
            "pixels": self.transform(image) if self.transform else image,
            "caption": caption,
            "image_id": index,
            "labels": {
                "colour": list(COLOURS).index(things[0].colour) if single else -1,
                "shape": SHAPES.index(things[0].shape) if single else -1,
            },
        }

    def captions(self) -> Iterator[str]:
        """The captions of the first samples (no rendering), enough to train a tokenizer on."""
        for index in range(min(self.num_samples, CAPTIONS_FOR_TOKENIZER)):
            rng = self._rng(index)
            things, relation = _scene(rng)
            yield _caption(things, relation, rng)


def write_shards(directory: str, split: str, num_samples: int, seed: int, image_size: int,
                 shard_size: int = 64) -> list[str]:
    """The synthetic samples of `split` as webdataset shards in data_prep's layout: KEY.jpg, KEY.txt, and KEY.json
    with the caption and, for one-object scenes, `colour` and `shape` (zero-shot labels). Recipes that read shards
    run on them with nothing to download. Returns the shard paths."""
    os.makedirs(directory, exist_ok=True)
    samples = SyntheticCaptions(split, num_samples, seed, image_size)
    paths = []
    for start in range(0, num_samples, shard_size):
        paths.append(os.path.join(directory, f"{start // shard_size:06d}.tar"))
        with wds.TarWriter(paths[-1], encoder=False, mtime=0) as sink:
            for index in range(start, min(start + shard_size, num_samples)):
                sample = samples[index]
                jpeg = io.BytesIO()
                sample["pixels"].save(jpeg, "JPEG", quality=95)
                classes = {name: SyntheticCaptions.zeroshot_tasks[name][0][value]
                           for name, value in sample["labels"].items() if value >= 0}
                meta = {"captions": [sample["caption"]], **classes}
                sink.write({"__key__": f"{index:08d}", "jpg": jpeg.getvalue(), "txt": sample["caption"].encode(),
                            "json": json.dumps(meta).encode()})
    return paths
