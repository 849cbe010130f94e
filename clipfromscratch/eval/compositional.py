"""The `compositional` task: does a model pick an image's true caption among hard negatives of the same words?

DATA, each item an image and caption options:
- `synthetic` (4-way) or `synthetic:2way`: binding, spatial and negation items drawn from the embedded renderer
  with the held-out "eval" vocabulary (clipfromscratch.data.compositional);
- `whatsup:FILE.json`: a list of {"image_path", "caption_options"}, the first option true (WhatsUp);
- `sugarcrepe:FILE.json`: {id: {"filename", "caption", "negative_caption"}} (SugarCrepe; the file's name is the
  category, e.g. swap_att);
- `negbench:FILE.csv`: columns correct_answer (the index of the true option, or its text), caption_0..caption_3,
  correct_answer_template (the category), image_path (NegBench's multiple-choice files);
- `aro:FILE.json`: VG-Relation / VG-Attribution records {image_path, bbox_x, bbox_y, bbox_w, bbox_h,
  true_caption, false_caption}; the image is cropped to the box, the category is the relation where one is named.
Image paths are relative to --images (default: the annotation file's folder). Unreadable images, and records
that lack a field, are skipped and counted (the first unreadable image named in the log).

Every model is scored by the cosine of its pooled embeddings; one with a DCSM head, by the head too. A tie
between the true option and others counts as the chance of picking it among them, so a model that cannot tell
two captions apart gets no credit for their order.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from clipfromscratch.data.compositional import ProbeItem, probe_items
from clipfromscratch.data.samples import UNREADABLE, UNREADABLE_IMAGE, SkipCounts, open_rgb
from clipfromscratch.data.specs import parse_data_spec
from clipfromscratch.dcsm import encode_captions, similarity_maps
from clipfromscratch.errors import UsageError, first_line
from clipfromscratch.eval.models import EvalModel

log = logging.getLogger(__name__)
SYNTHETIC_ITEMS = 300  # per run, the three categories in turn
SYNTHETIC_SIDE = 64  # rendered once, each model resizes to its own input
TIE = 1e-6  # scores this close (relative) count as equal
MAX_FAILURES_SHOWN = 24


@dataclass
class Scored:
    """One scoring of every item: the metrics block and, for the contact sheet, the items it got wrong."""

    metrics: dict[str, float]
    failures: list[tuple[ProbeItem, int]] = field(default_factory=list)  # (item, option it chose)


def _open_image(path: str, unreadable: SkipCounts, box: tuple[float, float, float, float] | None = None
                ) -> Image.Image | None:
    try:
        rgb = open_rgb(path)
    except UNREADABLE as err:  # a missing file is an OSError too
        unreadable.add(UNREADABLE_IMAGE, f"image {path}", err)
        return None
    if box is not None:
        x, y, w, h = box
        rgb = rgb.crop((x, y, x + w, y + h))
    return rgb


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {first_line(err)}") from None


def _whatsup(path: str, root: str, unreadable: SkipCounts) -> tuple[list[ProbeItem], int]:
    items, skipped = [], 0
    for record in _list_of_records(_read_json(path), path):
        options = record.get("caption_options")
        if not isinstance(record.get("image_path"), str) or not isinstance(options, list) or len(options) < 2:
            skipped += 1
            continue
        items.append(ProbeItem(functools.partial(_open_image, os.path.join(root, record["image_path"]), unreadable),
                               tuple(map(str, options)), "spatial"))
    return items, skipped


def _sugarcrepe(path: str, root: str, unreadable: SkipCounts) -> tuple[list[ProbeItem], int]:
    records = _read_json(path)
    if not isinstance(records, dict):
        raise UsageError(f"{path}: a SugarCrepe file is a mapping of ids to records")
    category = os.path.splitext(os.path.basename(path))[0]
    items, skipped = [], 0
    for record in records.values():
        fields = ("filename", "caption", "negative_caption")
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) and record[k] for k in fields):
            skipped += 1
            continue
        items.append(ProbeItem(functools.partial(_open_image, os.path.join(root, record["filename"]), unreadable),
                               (record["caption"], record["negative_caption"]), category))
    return items, skipped


def _negbench(path: str, root: str, unreadable: SkipCounts) -> tuple[list[ProbeItem], int]:
    items, skipped = [], 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    for row in rows:
        options = [row.get(f"caption_{k}") or "" for k in range(4)]
        correct = (row.get("correct_answer") or "").strip()
        index = int(correct) if correct.isdigit() else (options.index(correct) if correct in options else -1)
        if not row.get("image_path") or not all(options) or not 0 <= index < 4:
            skipped += 1
            continue
        ordered = (options[index], *(o for k, o in enumerate(options) if k != index))
        items.append(ProbeItem(functools.partial(_open_image, os.path.join(root, row["image_path"]), unreadable),
                               ordered, row.get("correct_answer_template") or "negbench"))
    return items, skipped


def _aro(path: str, root: str, unreadable: SkipCounts) -> tuple[list[ProbeItem], int]:
    items, skipped = [], 0
    for record in _list_of_records(_read_json(path), path):
        try:
            box = tuple(float(record[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
            options = (str(record["true_caption"]), str(record["false_caption"]))
            image = os.path.join(root, record["image_path"])
        except (KeyError, TypeError, ValueError):
            skipped += 1
            continue
        items.append(ProbeItem(functools.partial(_open_image, image, unreadable, box), options,
                               record.get("relation_name") or "attribution"))
    return items, skipped


def _list_of_records(records, path: str) -> list[dict]:
    if not isinstance(records, list):
        raise UsageError(f"{path}: expected a list of records")
    return [r if isinstance(r, dict) else {} for r in records]


READERS: dict[str, Callable[[str, str, SkipCounts], tuple[list[ProbeItem], int]]] = {
    "whatsup": _whatsup, "sugarcrepe": _sugarcrepe, "negbench": _negbench, "aro": _aro}


def open_probes(spec: str, images: str | None = None, num_samples: int | None = None,
                seed: int = 0) -> list[ProbeItem]:
    """The items DATA names (see the module's docstring)."""
    data = parse_data_spec(spec)
    if data.kind == "synthetic" and data.where in ("", "4way", "2way"):
        return probe_items("eval", 2 if data.where == "2way" else 4, num_samples or SYNTHETIC_ITEMS, seed,
                           SYNTHETIC_SIDE)
    if data.kind not in READERS:
        raise UsageError(f"compositional data '{spec}': give synthetic, synthetic:2way, or one of "
                         f"{', '.join(f'{k}:FILE' for k in READERS)}")
    path = data.where
    if not os.path.isfile(path):
        raise UsageError(f"annotation file not found: {path}")
    # one count of unreadable images for all the items: the log names the first, score_items sums them up
    items, skipped = READERS[data.kind](path, images or os.path.dirname(os.path.abspath(path)), SkipCounts())
    if skipped:
        log.warning("%s: skipped %d records without the fields an item needs", path, skipped)
    if not items:
        raise UsageError(f"no usable items in {path}")
    return items[:num_samples] if num_samples else items


def credit(scores: torch.Tensor) -> float:
    """1 if option 0 scores highest, 1/k if it ties with k - 1 others for the highest, else 0."""
    best = scores.max()
    tied = (scores >= best - TIE * max(1.0, abs(float(best)))).nonzero().flatten().tolist()
    return 1.0 / len(tied) if 0 in tied else 0.0


def summarise(credits: list[float], items: list[ProbeItem]) -> dict[str, float]:
    """The block of one scoring: accuracy, item count, chance, and accuracy per category."""
    metrics = {"acc": sum(credits) / len(credits), "n_items": float(len(credits)),
               "chance": sum(1 / len(item.options) for item in items) / len(items)}
    by_category: dict[str, list[float]] = defaultdict(list)
    for item, value in zip(items, credits):
        by_category[item.category].append(value)
    metrics.update({f"acc/{name}": sum(values) / len(values) for name, values in sorted(by_category.items())})
    return metrics


@torch.inference_mode()
def score_items(model: EvalModel, items: list[ProbeItem], batch_size: int = 64) -> dict[str, Scored]:
    """{"cosine": ..., "dcsm": ... where the model has a head}, over the items whose image could be read."""
    scorings = ["cosine"] + (["dcsm"] if model.dense_scorer is not None else [])
    credits: dict[str, list[float]] = {name: [] for name in scorings}
    failures: dict[str, list] = {name: [] for name in scorings}
    readable = []
    for start in range(0, len(items), batch_size):
        batch = [(item, item.load()) for item in items[start:start + batch_size]]
        batch = [(item, image) for item, image in batch if image is not None]
        if not batch:
            continue
        pixels = torch.stack([model.preprocess(image) for _, image in batch]).to(model.device)
        for name in scorings:
            for (item, _), scores in zip(batch, _SCORINGS[name](model, pixels, [item.options for item, _ in batch])):
                credits[name].append(credit(scores))
                if credits[name][-1] < 1 and len(failures[name]) < MAX_FAILURES_SHOWN:
                    failures[name].append((item, int(scores.argmax())))
        readable += [item for item, _ in batch]
    if not readable:
        raise UsageError(f"no readable images among the {len(items)} items (see the warnings above)")
    if len(readable) < len(items):
        log.warning("skipped %d items whose image could not be read", len(items) - len(readable))
    return {name: Scored(summarise(credits[name], readable), failures[name]) for name in scorings}


def _cosine_scores(model: EvalModel, pixels: torch.Tensor, options: list[tuple[str, ...]]) -> list[torch.Tensor]:
    images = model.encode_image(pixels).float()
    texts = model.encode_text([o for item in options for o in item]).float()
    return [images[k] @ part.t() for k, part in enumerate(texts.split([len(item) for item in options]))]


def _dense_scores(model: EvalModel, pixels: torch.Tensor, options: list[tuple[str, ...]]) -> list[torch.Tensor]:
    """Each image's map against its own options only: dense scoring reads every pair it scores."""
    image_tokens = model.encode_image_tokens(pixels).float()
    text_tokens, mask, functional = encode_captions(model.encode_text_tokens, model.tokenizer,
                                                    [o for item in options for o in item], model.device,
                                                    model.dense_scorer.text_tokens)
    text_tokens = text_tokens.float()
    scores, start = [], 0
    for k, item in enumerate(options):
        part = slice(start, start + len(item))
        maps = similarity_maps(image_tokens[k:k + 1], text_tokens[part], mask[part])
        scores.append(model.dense_scorer(maps, functional[part])[0])
        start += len(item)
    return scores


_SCORINGS = {"cosine": _cosine_scores, "dcsm": _dense_scores}
