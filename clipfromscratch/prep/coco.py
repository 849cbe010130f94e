"""COCO captions (2014 or 2017 annotations + image folders, optionally Karpathy's split file) -> train/val/test items.

With `dataset_coco.json` the splits are Karpathy's: train + restval (113,287 images), val (5,000), test (5,000).
Without it: the official train set, and the official val set in a fixed pseudo-random order cut into test and
val (5,000 each, or half each when smaller) with the rest added to train.
"""
from __future__ import annotations

import os
from collections import defaultdict

from clipfromscratch.errors import UsageError
from clipfromscratch.prep import writer

YEARS = ("2014", "2017")
PARTS = ("train", "val")  # the official sets, and their image folders PART + YEAR
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
HELD_OUT = 5000  # images in each of val and test, as in the Karpathy split


def _year(annotations: str, year: str | None) -> str:
    if not os.path.isdir(annotations):
        raise UsageError(f"annotations folder not found: {annotations}")
    complete = [y for y in YEARS if all(os.path.isfile(_annotation_file(annotations, p, y)) for p in PARTS)]
    if year is not None:
        if year not in complete:
            raise UsageError(f"no captions_train{year}.json and captions_val{year}.json in {annotations}")
        return year
    if not complete:
        raise UsageError(f"no captions_train<YEAR>.json and captions_val<YEAR>.json in {annotations} "
                         f"(YEAR: {', '.join(YEARS)})")
    if len(complete) > 1:
        raise UsageError(f"captions of several years in {annotations}: choose one with --year ({', '.join(complete)})")
    return complete[0]


def _annotation_file(annotations: str, part: str, year: str) -> str:
    return os.path.join(annotations, f"captions_{part}{year}.json")


def _official(annotations: str, images: str, year: str) -> tuple[dict[int, tuple[str, writer.Item]], int]:
    """image id -> (official part, item); and the number of images that have no caption."""
    found: dict[int, tuple[str, writer.Item]] = {}
    uncaptioned = 0
    for part in PARTS:
        folder = os.path.join(images, f"{part}{year}")
        if not os.path.isdir(folder):
            raise UsageError(f"image folder not found: {folder}")
        path = _annotation_file(annotations, part, year)
        data = writer.read_json(path)
        if not isinstance(data, dict) or not {"images", "annotations"} <= data.keys():
            raise UsageError(f"{path} is not a COCO captions file (no 'images' and 'annotations')")
        captions = defaultdict(list)
        try:
            for annotation in sorted(data["annotations"], key=lambda a: a["id"]):
                captions[annotation["image_id"]].append(annotation["caption"].strip())
            listed = [(image["id"], image["file_name"]) for image in data["images"]]
        except (KeyError, TypeError, AttributeError) as err:
            raise UsageError(f"{path}: malformed COCO captions entry ({type(err).__name__}: {err})") from None
        for image_id, file_name in listed:
            if not captions[image_id]:
                uncaptioned += 1
                continue
            meta = {"image_id": image_id, "file_name": file_name}
            item = writer.Item(f"{image_id:012d}", os.path.join(folder, file_name), tuple(captions[image_id]), meta)
            found[image_id] = (part, item)
    return found, uncaptioned


def _karpathy(path: str) -> dict[int, str]:
    """COCO image id -> our split, from Karpathy's dataset_coco.json."""
    data = writer.read_json(path)
    try:
        return {int(image["cocoid"]): KARPATHY_SPLITS[image["split"]] for image in data["images"]}
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{path} is not Karpathy's dataset_coco.json (images with cocoid and split)") from None


def coco_splits(annotations: str, images: str, karpathy: str | None = None, year: str | None = None
                ) -> tuple[writer.Splits, dict]:
    """{split: items in image id order}, and counts about the source for the summary."""
    official, uncaptioned = _official(annotations, images, _year(annotations, year))
    source = {"images in the annotations": len(official) + uncaptioned, "images without captions": uncaptioned}
    if karpathy:
        split_of = _karpathy(karpathy)
        source["Karpathy images not in the annotations"] = len(split_of.keys() - official.keys())
        source["annotated images not in the Karpathy split"] = len(official.keys() - split_of.keys())
    else:
        val = [str(i) for i, (part, _) in official.items() if part == "val"]
        held_out = min(HELD_OUT, len(val) // 2)
        order = [int(key) for key in writer.stable_order(val)]
        split_of = {i: "train" for i, (part, _) in official.items() if part == "train"}
        split_of |= {i: "test" for i in order[:held_out]} | {i: "val" for i in order[held_out:2 * held_out]}
        split_of |= {i: "train" for i in order[2 * held_out:]}
    splits: writer.Splits = {"train": [], "val": [], "test": []}
    for image_id in sorted(official.keys() & split_of.keys()):
        splits[split_of[image_id]].append(official[image_id][1])
    return splits, source


def main(argv: list[str] | None = None) -> int:
    parser = writer.argument_parser("COCO captions -> webdataset shards for train, val and test.")
    parser.add_argument("--annotations", required=True, help="folder holding captions_{train,val}{2014|2017}.json")
    parser.add_argument("--images", required=True, help="folder holding train2014/ and val2014/ (or the 2017 ones)")
    parser.add_argument("--karpathy", help="Karpathy's dataset_coco.json: use its train/restval, val and test split")
    parser.add_argument("--year", choices=YEARS, help="which annotations, when the folder holds several years")
    return writer.run(parser, argv, lambda a: coco_splits(a.annotations, a.images, a.karpathy, a.year))
