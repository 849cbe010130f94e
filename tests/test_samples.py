"""One damaged shard read by training, validation and evaluation: the same samples kept, the same ones skipped."""
import io
import json
import logging

import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from clipfromscratch.config import DataConfig
from clipfromscratch.data.datamodule import CaptionDataModule
from clipfromscratch.data.samples import (
    MALFORMED_JSON,
    NO_CAPTION,
    NO_IMAGE,
    NO_LABEL,
    SHOWN_PER_REASON,
    UNREADABLE_IMAGE,
    SkipCounts,
)
from clipfromscratch.data.shard_index import IndexedShards
from clipfromscratch.data.shards import CaptionShards
from clipfromscratch.data.tsv import CaptionTable
from clipfromscratch.eval.data import ImageFiles, open_captioned, open_labelled

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
GOOD = [("red", ["a red square"]), ("green", ["a green square", "a green tile"]), ("blue", ["a blue webp"])]
SKIPPED = {UNREADABLE_IMAGE: 2, NO_IMAGE: 1, NO_CAPTION: 2, MALFORMED_JSON: 2}


def encoded(colour: str, fmt: str, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buffer, fmt)
    return buffer.getvalue()


def damaged_shard(path) -> str:
    """3 good samples among 7 bad ones, one of each way a sample can fail (two of some)."""
    samples = [
        {"jpg": encoded("red", "JPEG"), "txt": "a red square", "json": json.dumps({"articleType": "Shoes"})},
        {"png": encoded("green", "PNG"), "txt": "a green square",
         "json": json.dumps({"captions": ["a green square", "a green tile"]})},
        {"jpg": encoded("blue", "JPEG", size=64)[:200], "txt": "a truncated jpeg"},  # unreadable image
        {"txt": "a caption without an image"},  # no image
        {"png": encoded("red", "PNG"), "txt": "   "},  # no caption
        {"png": encoded("green", "PNG"), "txt": "broken json", "json": "{not json"},  # malformed json
        {"png": encoded("blue", "PNG"), "txt": "json, but a list", "json": "[1, 2]"},  # malformed json
        {"jpg": b"not an image at all", "txt": "garbage bytes"},  # unreadable image
        # as data_prep/fashion.py writes labels: under "labels"
        {"webp": encoded("blue", "WEBP"), "txt": "a blue webp",
         "json": json.dumps({"labels": {"articleType": "Shirts"}})},
        {"png": encoded("red", "PNG"), "txt": "not used", "json": json.dumps({"captions": ["", " "]})},  # no caption
    ]
    with wds.TarWriter(str(path)) as sink:
        for key, sample in enumerate(samples):
            sink.write({"__key__": f"{key:04d}", **sample})
    return str(path)


def colour_of(pixels: torch.Tensor) -> str:
    mean = pixels.float().mean(dim=(1, 2))
    return min(COLOURS, key=lambda name: float(((mean - torch.tensor(COLOURS[name])) ** 2).sum()))


def skip_messages(caplog) -> list[str]:
    messages = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping sample"))
    caplog.clear()
    return messages


def test_training_validation_and_evaluation_keep_and_skip_the_same_samples(tmp_path, caplog):
    shard = damaged_shard(tmp_path / "damaged.tar")
    caplog.set_level(logging.WARNING)

    training = CaptionShards(shard, None, shuffle=False, shuffle_buffer=DataConfig.shuffle_buffer)
    streamed = list(training)
    training_log = skip_messages(caplog)
    assert [colour_of(s["pixels"]) for s in streamed] == [colour for colour, _ in GOOD]
    assert all(s["caption"] in captions for s, (_, captions) in zip(streamed, GOOD))  # one drawn per visit
    assert training.skipped == SKIPPED

    validation = IndexedShards(shard, None)
    rows = [validation[i] for i in range(len(validation))]
    assert sum(row is None for row in rows) == 2  # the rows of the two images that cannot be decoded
    validation_log = skip_messages(caplog)
    grouped: dict[int, list] = {}
    for row in filter(None, rows):
        grouped.setdefault(row["image_id"], []).append(row)
    indexed = [(pil_to_tensor(group[0]["pixels"]), [row["caption"] for row in group]) for group in grouped.values()]
    assert [(colour_of(pixels), captions) for pixels, captions in indexed] == GOOD
    assert validation.skipped == SKIPPED

    evaluation = open_captioned(shard)
    read = list(evaluation)
    assert sum(sample is None for sample in read) == sum(SKIPPED.values())  # a None in place of each, to be counted
    evaluated = [(pil_to_tensor(image), captions) for image, captions in filter(None, read)]
    evaluation_log = skip_messages(caplog)
    assert [(colour_of(pixels), captions) for pixels, captions in evaluated] == GOOD
    assert evaluation.skipped == SKIPPED

    # the very same pixels, and the same warnings, naming the first skipped samples of each reason, e.g.
    # "skipping sample 0003 in .../damaged.tar: no image"
    for (pixels, _), (indexed_pixels, _), sample in zip(evaluated, indexed, streamed):
        assert torch.equal(pixels, indexed_pixels) and torch.equal(pixels, sample["pixels"])
    assert len(training_log) == sum(min(n, SHOWN_PER_REASON) for n in SKIPPED.values())
    assert training_log == validation_log == evaluation_log
    assert f"skipping sample 0003 in {shard}: no image" in training_log


def test_labels_are_read_flat_or_under_labels_and_replace_the_caption_requirement(tmp_path):
    shard = damaged_shard(tmp_path / "damaged.tar")
    labelled = open_labelled(shard, label="articleType")
    assert labelled.classnames == ["Shirts", "Shoes"]
    assert [(colour_of(pil_to_tensor(image)), label) for image, label in filter(None, labelled.test)] == [
        ("red", 1), ("blue", 0)]
    # a label is asked for, not a caption: samples without one are skipped for that, before their image is decoded
    assert labelled.test.skipped == {NO_IMAGE: 1, MALFORMED_JSON: 2, NO_LABEL: 5}


def test_unreadable_image_files_are_counted_under_the_same_reason(tmp_path, caplog):
    (tmp_path / "good.png").write_bytes(encoded("green", "PNG"))
    (tmp_path / "corrupt.jpg").write_bytes(encoded("red", "JPEG", size=64)[:200])
    table = tmp_path / "t.tsv"
    table.write_text("filepath\tcaption\ngood.png\tgreen\ncorrupt.jpg\tred\n")
    files = ImageFiles([str(tmp_path / "good.png"), str(tmp_path / "corrupt.jpg")], ["green", "red"])
    rows = CaptionTable(table, None)
    with caplog.at_level(logging.WARNING):
        assert files[1] is None and rows[1] is None
    assert files.skipped == rows.skipped == {UNREADABLE_IMAGE: 1}
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"skipping image {tmp_path / 'corrupt.jpg'}: unreadable image"] * 2


def test_a_csv_table_is_split_on_commas_in_training_and_evaluation(tmp_path):
    for colour in ("red", "blue"):
        (tmp_path / f"{colour}.png").write_bytes(encoded(colour, "PNG"))
    (tmp_path / "pairs.csv").write_text('filepath,caption\nred.png,"red, square"\nblue.png,blue\n')
    (tmp_path / "pairs.tsv").write_text("filepath\tcaption\nred.png\tred, square\nblue.png\tblue\n")
    (tmp_path / "semicolons.csv").write_text("filepath;caption\nred.png;red, square\nblue.png;blue\n")
    expected = ["red, square", "blue"]
    for table in ("pairs.csv", "pairs.tsv"):
        data = CaptionDataModule(DataConfig(train_data=str(tmp_path / table), val_data=str(tmp_path / table)), 8, 0)
        assert list(data.train_set.captions()) == list(data.val_set.captions()) == expected
        assert [captions for _, captions in open_captioned(str(tmp_path / table))] == [[c] for c in expected]
    # --csv-separator overrides the suffix in training
    data = CaptionDataModule(DataConfig(train_data=str(tmp_path / "semicolons.csv"), csv_separator=";"), 8, 0)
    assert list(data.train_set.captions()) == expected


def test_skips_are_logged_for_the_first_few_of_each_reason_then_only_counted(caplog):
    skipped = SkipCounts()
    with caplog.at_level(logging.WARNING):
        for key in range(SHOWN_PER_REASON + 4):
            skipped.add(UNREADABLE_IMAGE, f"sample {key}", "truncated")
        skipped.add(NO_CAPTION, "sample 99")
    assert skipped == {UNREADABLE_IMAGE: SHOWN_PER_REASON + 4, NO_CAPTION: 1}
    assert [r.getMessage() for r in caplog.records] == [
        *(f"skipping sample {key}: unreadable image (truncated)" for key in range(SHOWN_PER_REASON)),
        "skipping more samples for unreadable image: counted, not shown", "skipping sample 99: no caption"]
