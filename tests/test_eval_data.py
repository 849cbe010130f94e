"""Evaluation data: captions grouped per image (tables and shards), labels from KEY.json, the synthetic splits."""
import io
import json

import pytest
import webdataset as wds
from PIL import Image

from clipfromscratch.errors import UsageError
from clipfromscratch.eval.data import open_captioned, open_labelled


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_caption_table_groups_captions_by_image_path(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (12, 10), (200, 0, 0)).save(tmp_path / f"{name}.png")
    rows = ["filepath\tcaption", "a.png\tfirst of a", "b.png\tonly b", "./a.png\tsecond of a", "missing.png\tgone"]
    (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    samples = list(open_captioned(str(tmp_path / "captions.tsv")))
    assert [captions for _, captions in samples[:2]] == [["first of a", "second of a"], ["only b"]]
    assert samples[2] is None  # an unreadable image drops out together with its captions


def test_shards_give_captions_lists_and_json_labels(tmp_path):
    with wds.TarWriter(str(tmp_path / "000.tar")) as sink:
        sink.write({"__key__": "0", "png": _png((0, 0, 200)), "txt": "a blue shirt",
                    "json": json.dumps({"articleType": "Shirts", "captions": ["a blue shirt", "a shirt"]})})
        # as data_prep/fashion.py writes it: the class columns under "labels"
        sink.write({"__key__": "1", "png": _png((200, 0, 0)), "txt": "red shoes",
                    "json": json.dumps({"id": 1, "labels": {"articleType": "Shoes", "gender": "Men"}})})
        sink.write({"__key__": "2", "png": _png((0, 200, 0)), "txt": "a green shirt",
                    "json": json.dumps({"articleType": "Shirts"})})
    captioned = [captions for _, captions in open_captioned(str(tmp_path))]
    assert captioned == [["a blue shirt", "a shirt"], ["red shoes"], ["a green shirt"]]
    labelled = open_labelled(str(tmp_path), label="articleType")
    assert labelled.classnames == ["Shirts", "Shoes"] and labelled.train is None
    assert [label for _, label in labelled.test] == [0, 1, 0]
    with pytest.raises(UsageError, match="no sample .* has 'colour'"):
        open_labelled(str(tmp_path), label="colour")
    with pytest.raises(UsageError, match="give --label"):
        open_labelled(str(tmp_path))


def test_synthetic_labels_skip_two_object_scenes_and_have_two_splits():
    data = open_labelled("synthetic", label="colour", num_samples=30)
    test = [data.test[i] for i in range(len(data.test))]
    labelled = [s for s in test if s is not None]
    assert 0 < len(labelled) < 30  # about 30% of scenes hold two objects and no single class
    assert all(0 <= label < len(data.classnames) for _, label in labelled)
    assert data.train is not None and data.templates and data.templates[0]("red") == "a red circle"
