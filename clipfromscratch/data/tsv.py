"""Caption tables: a .tsv/.csv file with a header row, one image path and one caption per row.

Its columns are split on commas in a .csv, on tabs otherwise, unless the caller names the separator; training
and evaluation both read tables here, so they split them alike.
"""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image

from clipfromscratch.data.samples import UNREADABLE, UNREADABLE_IMAGE, SkipCounts, open_rgb
from clipfromscratch.errors import UsageError

log = logging.getLogger(__name__)
TABLE_SUFFIXES = (".tsv", ".csv")


def is_caption_table(spec: str) -> bool:
    """Whether a data SPEC names a caption table (by its suffix)."""
    return spec.lower().endswith(TABLE_SUFFIXES)


def table_separator(path: str | os.PathLike) -> str:
    """The column separator of a table by its suffix: a comma for .csv, a tab otherwise."""
    return "," if str(path).lower().endswith(".csv") else "\t"


class CaptionTable(torch.utils.data.Dataset):
    """Image-caption pairs listed in a table; relative image paths are relative to the table's folder.

    `separator` None: by the table's suffix (`table_separator`). When the table is read, malformed rows are
    counted in `skipped_rows` and rows whose image file does not exist in `missing_images`, one log line for all;
    a row whose image exists but cannot be decoded gives None, counted in `skipped`.
    """

    def __init__(self, path: str | os.PathLike, transform: Callable[[Image.Image], torch.Tensor] | None,
                 img_key: str = "filepath", caption_key: str = "caption", separator: str | None = None):
        self.transform = transform
        self.skipped_rows = 0
        self.missing_images = 0
        self.skipped = SkipCounts()
        self.rows: list[tuple[int, str]] = []  # (image_id, caption)

        table = Path(path)
        if not table.is_file():
            raise UsageError(f"caption table not found: {table}")
        separator = table_separator(table) if separator is None else separator
        if len(separator) != 1:
            raise UsageError(f"csv separator must be a single character, got {separator!r}")
        image_ids: dict[str, int] = {}
        exists: dict[str, bool] = {}
        first_missing = None
        try:
            with open(table, newline="", encoding="utf-8") as f:
                reader = csv.reader(f, delimiter=separator)
                header = [name.strip() for name in next(reader, [])]
                if not header:
                    raise UsageError(f"caption table is empty: {table}")
                image_col = _column(header, img_key, table)
                caption_col = _column(header, caption_key, table)
                for row in reader:
                    if not row:  # blank line
                        continue
                    fields = [field.strip() for field in row]
                    if len(fields) != len(header) or not fields[image_col] or not fields[caption_col]:
                        self.skipped_rows += 1
                        continue
                    resolved = os.path.normpath(os.path.join(table.parent, fields[image_col]))
                    if not exists.setdefault(resolved, os.path.isfile(resolved)):
                        self.missing_images += 1
                        first_missing = first_missing or resolved
                        continue
                    image_id = image_ids.setdefault(resolved, len(image_ids))
                    self.rows.append((image_id, fields[caption_col]))
        except (UnicodeDecodeError, csv.Error) as exn:
            raise UsageError(f"cannot read caption table {table}: {exn}") from None
        self.image_paths = list(image_ids)  # unique resolved paths, indexed by image_id

        skipped = []
        if self.skipped_rows:
            skipped.append(f"{self.skipped_rows} malformed rows (wrong number of fields, or empty path or caption)")
        if self.missing_images:
            skipped.append(f"{self.missing_images} rows whose image file does not exist, e.g. {first_missing}")
        if not self.rows:
            raise UsageError(f"caption table {table} has no usable rows" + (f": {'; '.join(skipped)}" if skipped
                                                                             else ""))
        if skipped:
            log.warning("%s: skipped %s", table, "; ".join(skipped))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict | None:
        image_id, caption = self.rows[index]
        path = self.image_paths[image_id]
        try:
            rgb = open_rgb(path)
        except UNREADABLE as exn:
            self.skipped.add(UNREADABLE_IMAGE, f"image {path}", exn)
            return None
        return {"pixels": self.transform(rgb) if self.transform else rgb, "caption": caption, "image_id": image_id}

    def readable_rows(self, wanted: int) -> int:
        """The rows whose image can be decoded, in table order, counted up to `wanted`; each image is opened once
        and nothing is logged (a check before training, which reports the count itself)."""
        readable, decodes = 0, {}  # image_id -> whether it decodes
        for image_id, _ in self.rows:
            if image_id not in decodes:
                try:
                    open_rgb(self.image_paths[image_id])
                    decodes[image_id] = True
                except UNREADABLE:
                    decodes[image_id] = False
            readable += decodes[image_id]
            if readable == wanted:
                break
        return readable

    def captions_per_image(self) -> list[list[str]]:
        """For each image (by image_id) all of its captions, in table order."""
        captions: list[list[str]] = [[] for _ in self.image_paths]
        for image_id, caption in self.rows:
            captions[image_id].append(caption)
        return captions

    def captions(self) -> Iterator[str]:
        """Every caption in table order (no images are read)."""
        for _, caption in self.rows:
            yield caption


def _column(header: list[str], key: str, table: Path) -> int:
    if key not in header:
        hint = " (wrong separator?)" if len(header) == 1 else ""
        raise UsageError(f"column {key!r} not in caption table {table}{hint}; columns: {', '.join(header)}")
    return header.index(key)
