"""Evaluation data: captions grouped per image (tables and shards), labels from KEY.json, the synthetic splits;
unreadable shards and images skipped and summed up, and data with nothing readable a one-line error."""
import io
import json
import logging

import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import functional as TF

from clipfromscratch.data.samples import SHOWN_PER_REASON
from clipfromscratch.data.specs import parse_data_spec
from clipfromscratch.errors import UsageError
from clipfromscratch.eval.data import NO_CLASS, UNREADABLE_SHARD, ImageFiles, open_captioned, open_labelled
from clipfromscratch.eval.embed import encode_images
from clipfromscratch.eval.models import EvalModel


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_caption_table_groups_captions_by_image_path(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (12, 10), (200, 0, 0)).save(tmp_path / f"{name}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = ["filepath\tcaption", "a.png\tfirst of a", "b.png\tonly b", "./a.png\tsecond of a", "broken.png\tgone"]
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
    labelled = [s for s in test if s is not NO_CLASS]
    # about 30% of scenes hold two objects and no single class: left out, but not as skipped (None) samples
    assert 0 < len(labelled) < 30 and None not in test
    assert all(0 <= label < len(data.classnames) for _, label in labelled)
    assert data.train is not None and data.templates and data.templates[0]("red") == "a red circle"


def _shard(path, colours) -> str:
    with wds.TarWriter(str(path)) as sink:
        for key, colour in enumerate(colours):
            sink.write({"__key__": f"{key:03d}", "png": _png(colour), "txt": f"colour {key}"})
    return str(path)


def test_shards_that_are_no_tar_files_are_skipped_in_one_warning_and_none_at_all_is_an_error(tmp_path, caplog):
    _shard(tmp_path / "000.tar", [(200, 0, 0), (0, 200, 0)])
    (tmp_path / "001.tar").write_text("hi\n")
    with caplog.at_level(logging.WARNING):
        assert [captions for _, captions in open_captioned(str(tmp_path))] == [["colour 0"], ["colour 1"]]
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "skipping 1 of 2 shards that do not open as tar files"]
    with pytest.raises(UsageError, match=r"no readable shards in .*001.tar: 1 of 1 do not open as tar files"):
        open_captioned(str(tmp_path / "001.tar"))
    with pytest.raises(UsageError, match="no readable shards"):
        open_labelled(str(tmp_path / "001.tar"), label="articleType")


def test_a_shard_damaged_part_way_gives_what_it_holds_before_the_damage(tmp_path):
    whole = _shard(tmp_path / "whole.tar", [(200, 0, 0)] * 6)
    data = open(whole, "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])
    shards = open_captioned(str(tmp_path / "cut.tar"))
    samples = list(shards)
    assert 0 < len(samples) < 6 and samples[0][1] == ["colour 0"]
    assert shards.skipped[UNREADABLE_SHARD] == 1


def _tiny_model() -> EvalModel:
    return EvalModel("mean colour", lambda pixels: pixels.mean((2, 3)), None, TF.to_tensor, None, 1.0,
                     torch.device("cpu"), 0.0)


def test_encoding_sums_up_unreadable_images_in_one_line_and_none_readable_is_an_error(tmp_path, caplog):
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        if i == 0:
            Image.new("RGB", (12, 10), (200, 0, 0)).save(paths[-1])
        else:
            (tmp_path / f"{i}.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        features, targets = encode_images(_tiny_model(), ImageFiles(paths, list(range(6))), batch_size=2)
    assert features.shape == (1, 3) and targets == [0]
    messages = [r.getMessage().split(":")[0] for r in caplog.records]
    # the first named, then one line for the rest, then the sum
    assert messages == [f"skipping image {path}" for path in paths[1:1 + SHOWN_PER_REASON]] + [
        "skipping more samples for unreadable image", "skipped 5 unreadable samples (1 images encoded)"]
    with pytest.raises(UsageError, match="no readable images to encode: all 5 samples were skipped"):
        encode_images(_tiny_model(), ImageFiles(paths[1:], list(range(5))), batch_size=2)


def test_an_image_folder_with_unreadable_files_skips_them(tmp_path):
    for name in ("red", "blue"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (12, 10), (200, 0, 0)).save(tmp_path / name / "good.png")
        (tmp_path / name / "broken.png").write_bytes(b"not a png")
    data = open_labelled(f"imagefolder:{tmp_path}")
    features, labels = encode_images(_tiny_model(), data.test)
    assert labels == [0, 1] and data.test.skipped == {"unreadable image": 2}


@pytest.mark.parametrize("spec, kind, where", [
    ("synthetic", "synthetic", ""), ("synthetic:2way", "synthetic", "2way"), ("imagefolder:~/pets", "imagefolder",
                                                                              "~/pets"),
    ("cifar100:/data", "cifar100", "/data"), ("aro:vgr.json", "aro", "vgr.json"), ("train.TSV", "table", "train.TSV"),
    ("shards/{000..009}.tar", "shards", "shards/{000..009}.tar"), ("s3://bucket/a.tar", "shards", "s3://bucket/a.tar"),
    ("pipe:curl -s x.tar", "shards", "pipe:curl -s x.tar"),
])
def test_one_parser_reads_every_data_spec(spec, kind, where):
    parsed = parse_data_spec(spec)
    assert (parsed.kind, parsed.where) == (kind, where)


@pytest.mark.parametrize("read, spec, message", [
    (lambda spec: open_labelled(spec, label="x"), "whatsup:a.json", "a labelled task takes synthetic, imagefolder"),
    (open_captioned, "sugarcrepe:b.json", "a captioned task takes synthetic, a caption table or shards"),
    (open_captioned, "synthetic:2way", "a captioned task takes"),
])
def test_a_reader_refuses_the_kinds_it_cannot_use_in_one_line(read, spec, message):
    with pytest.raises(UsageError, match=message):
        read(spec)
