"""Any captioned set: a .tsv/.csv caption table (image path + caption per row) -> the items of one split.

Rows naming the same image become one sample holding all its captions. (img2dataset's webdataset output
needs no preparation: train on its folder of shards directly.)
"""
from __future__ import annotations

import os

from clipfromscratch.data.tsv import CaptionTable
from clipfromscratch.prep import writer


def table_splits(path: str, split: str, img_key: str, caption_key: str, separator: str | None
                 ) -> tuple[writer.Splits, dict]:
    """{split: one item per image, in order of first appearance}, and the table's row counts."""
    table = CaptionTable(path, None, img_key, caption_key, separator)
    captions = table.captions_per_image()
    folder = os.path.dirname(os.path.abspath(path))
    items = [writer.Item(f"{image_id:09d}", image, tuple(captions[image_id]),
                       {"file_name": os.path.relpath(image, folder)})
             for image_id, image in enumerate(table.image_paths)]
    counts = {"rows": len(table.rows), "malformed rows": table.skipped_rows}
    if table.missing_images:  # left out when the table was read, so the shards' own counts never see them
        counts["rows whose image is missing"] = table.missing_images
    return {split: items}, counts


def main(argv: list[str] | None = None) -> int:
    parser = writer.argument_parser("A caption table (.tsv/.csv: image path, caption) -> webdataset shards.")
    parser.add_argument("--input", required=True, help="the table; relative image paths are relative to its folder")
    parser.add_argument("--split", default="train", help="name of the output split folder (default: train)")
    parser.add_argument("--img-key", default="filepath", help="image path column (default: filepath)")
    parser.add_argument("--caption-key", default="caption", help="caption column (default: caption)")
    parser.add_argument("--separator", help="column separator (default: ',' for .csv, tab otherwise)")
    return writer.run(parser, argv, lambda a: table_splits(a.input, a.split, a.img_key, a.caption_key, a.separator))
