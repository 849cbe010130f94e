"""Fashion Product Images (Small or full): styles.csv + images/{id}.jpg -> train/val/test items.

The caption is productDisplayName; the class columns are kept as labels in KEY.json. The split is fixed and
stratified by articleType: within each article type of at least MIN_STRATUM products (the rarer types form
one pool), products in a pseudo-random order that depends only on their id go 10% to test, 10% to val, the
rest to train.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict

from clipfromscratch.errors import UsageError
from clipfromscratch.prep import writer

COLUMNS = ("id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year", "usage",
           "productDisplayName")
LABELS = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage")
TEST_FRACTION = VAL_FRACTION = 0.1
MIN_STRATUM = 10  # smaller article types would get no val or test product of their own


def read_styles(path: str, images: str) -> tuple[list[writer.Item], dict]:
    """One item per parseable row, in file order; and counts of what was recovered or could not be used."""
    if not os.path.isfile(path):
        raise UsageError(f"styles file not found: {path}")
    if not os.path.isdir(images):
        raise UsageError(f"image folder not found: {images}")
    counts = Counter()
    items: dict[str, writer.Item] = {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            header = tuple(f.readline().strip().split(","))
            if header != COLUMNS:
                raise UsageError(f"{path} does not start with the styles.csv header {','.join(COLUMNS)}")
            for line in f:
                if not line.strip():
                    continue
                counts["rows"] += 1
                # the name is the last column and may hold unquoted commas: it is everything after the 9th comma
                fields = [value.strip() for value in line.rstrip("\r\n").split(",", len(COLUMNS) - 1)]
                name = fields[-1]
                if len(fields) != len(COLUMNS) or not fields[0].isdigit() or not name:
                    counts["unparseable rows"] += 1
                    continue
                if len(name) > 1 and name[0] == name[-1] == '"':  # quoted by a csv writer
                    name = name[1:-1].replace('""', '"')
                elif "," in name:
                    counts["names with unquoted commas recovered"] += 1
                key = str(int(fields[0]))
                if key in items:
                    counts["duplicate ids"] += 1
                    continue
                labels = {column: fields[COLUMNS.index(column)] for column in LABELS}
                items[key] = writer.Item(key, os.path.join(images, f"{key}.jpg"), (name,),
                                       {"id": int(key), "labels": labels})
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text: {err}") from None
    return list(items.values()), dict(counts)


def stratified_split(items: list[writer.Item]) -> writer.Splits:
    """{train, val, test: items in id order}, stratified by articleType."""
    types = Counter(item.meta["labels"]["articleType"] for item in items)
    strata = defaultdict(list)
    for item in items:
        article_type = item.meta["labels"]["articleType"]
        strata[article_type if types[article_type] >= MIN_STRATUM else None].append(item.key)
    split_of = {}
    for keys in strata.values():
        order = writer.stable_order(keys)
        n_test, n_val = round(len(order) * TEST_FRACTION), round(len(order) * VAL_FRACTION)
        split_of |= {key: "test" for key in order[:n_test]}
        split_of |= {key: "val" for key in order[n_test:n_test + n_val]}
        split_of |= {key: "train" for key in order[n_test + n_val:]}
    splits: writer.Splits = {"train": [], "val": [], "test": []}
    for item in sorted(items, key=lambda item: item.meta["id"]):
        splits[split_of[item.key]].append(item)
    return splits


def fashion_splits(styles: str, images: str) -> tuple[writer.Splits, dict]:
    items, counts = read_styles(styles, images)
    return stratified_split(items), counts


def main(argv: list[str] | None = None) -> int:
    parser = writer.argument_parser("Fashion Product Images -> webdataset shards for train, val and test.")
    parser.add_argument("--styles", required=True, help="the dataset's styles.csv")
    parser.add_argument("--images", required=True, help="the folder holding {id}.jpg")
    return writer.run(parser, argv, lambda a: fashion_splits(a.styles, a.images))
