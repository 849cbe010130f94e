import contextlib
import io
import json
import logging
import re

import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import functional as TF

from clipfromscratch.config import DataConfig
from clipfromscratch.data.datamodule import _Substituting
from clipfromscratch.data.samples import NO_CAPTION, NO_IMAGE, UNREADABLE_IMAGE
from clipfromscratch.data.shard_index import IndexedShards
from clipfromscratch.data.shards import CaptionShards, resolve_shard_urls, shard_sample_count
from clipfromscratch.data.tsv import CaptionTable
from clipfromscratch.errors import UsageError

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
BUFFER = DataConfig.shuffle_buffer


def transform(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """Tables give PIL images, training shards decoded uint8 tensors: either -> (3, 8, 8) in [0, 1]."""
    if isinstance(image, Image.Image):
        return TF.to_tensor(image.resize((8, 8)))
    return TF.resize(image, [8, 8]).float() / 255


def image_bytes(colour: str, fmt: str = "PNG", size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buffer, fmt)
    return buffer.getvalue()


def colour_of(pixels: torch.Tensor) -> str:
    """The COLOURS name of a solid 8x8 image's tensor (JPEG is lossy, so nearest colour)."""
    assert pixels.shape == (3, 8, 8)
    mean = pixels.mean(dim=(1, 2)) * 255
    return min(COLOURS, key=lambda name: float(((mean - torch.tensor(COLOURS[name])) ** 2).sum()))


def write_table(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_shard(path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def ok_sample(key: str, colour: str, ext: str = "jpg") -> dict:
    fmt = "JPEG" if ext == "jpg" else ext.upper()
    return {"__key__": key, ext: image_bytes(colour, fmt), "txt": f"a {colour} square {key}", "json": "{}"}


# caption tables


def test_table_resolves_paths_against_its_folder_and_groups_images(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for colour in ("red", "green"):
        (data / "images" / f"{colour}.png").write_bytes(image_bytes(colour))
    green = data / "images" / "green.png"
    table = write_table(data / "captions.tsv", "filepath\tcaption\n"
                        "images/red.png\ta red square\n"
                        "images/green.png\ta green square\n"
                        f"./images/red.png\tred, again\n"
                        f"{green}\tgreen, absolute\n")
    monkeypatch.chdir(tmp_path)  # not the table's folder: relative paths must not depend on the cwd

    ds = CaptionTable(table, transform)
    samples = [ds[i] for i in range(len(ds))]
    assert [s["caption"] for s in samples] == ["a red square", "a green square", "red, again", "green, absolute"]
    assert [colour_of(s["pixels"]) for s in samples] == ["red", "green", "red", "green"]
    assert [s["image_id"] for s in samples] == [0, 1, 0, 1]
    assert ds.skipped_rows == 0 and ds.skipped == {}


def test_table_custom_columns_and_separator(tmp_path):
    (tmp_path / "b.png").write_bytes(image_bytes("blue", size=16))
    table = write_table(tmp_path / "pairs.csv", 'id,text,img\n7,"a blue square, large",b.png\n8,blue again,b.png\n')
    ds = CaptionTable(table, transform, img_key="img", caption_key="text", separator=",")
    assert list(ds.captions()) == ["a blue square, large", "blue again"]
    assert ds[0]["pixels"].shape == (3, 8, 8)
    assert colour_of(ds[0]["pixels"]) == "blue"


def test_table_skips_malformed_rows_with_one_warning(tmp_path, caplog):
    (tmp_path / "r.png").write_bytes(image_bytes("red"))
    table = write_table(tmp_path / "t.tsv", "filepath\tcaption\n"
                        "r.png\ttoo\tmany fields\n"
                        "r.png\t \n"
                        "\tno image\n"
                        "r.png\n"
                        "\n"  # a blank line is not a row
                        "r.png\tthe good one\n")
    with caplog.at_level(logging.WARNING):
        ds = CaptionTable(table, transform)
    assert ds.skipped_rows == 4
    assert list(ds.captions()) == ["the good one"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 4 malformed rows" in warnings[0]


def test_table_unreadable_images_are_none_and_counted(tmp_path):
    (tmp_path / "good.png").write_bytes(image_bytes("green"))
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "truncated.jpg").write_bytes(image_bytes("red", "JPEG", size=64)[:200])
    table = write_table(tmp_path / "t.tsv", "filepath\tcaption\n"
                        "garbage.png\tgarbage\nmissing.png\tmissing\ntruncated.jpg\ttruncated\ngood.png\tgood\n")
    ds = CaptionTable(table, transform)
    # a row whose file does not exist is left out when the table is read; one that exists is tried when read
    assert ds.missing_images == 1 and len(ds) == 3
    assert [ds[i] for i in range(2)] == [None, None]
    assert ds.skipped == {UNREADABLE_IMAGE: 2}
    assert ds[2]["caption"] == "good" and colour_of(ds[2]["pixels"]) == "green"


def test_a_table_whose_images_are_all_missing_is_one_line_with_the_counts(tmp_path, caplog):
    table = write_table(tmp_path / "t.tsv", "filepath\tcaption\n" + "".join(f"{i}.png\tcap {i}\n" for i in range(50)))
    with caplog.at_level(logging.WARNING), usage_error("no usable rows: 50 rows whose image file does not exist, "
                                                       f"e.g. {re.escape(str(tmp_path / '0.png'))}"):
        CaptionTable(table, transform)
    assert not caplog.records  # no line per image


@contextlib.contextmanager
def usage_error(match: str):
    """Expect a UsageError whose single-line message matches."""
    with pytest.raises(UsageError, match=match) as info:
        yield
    assert "\n" not in str(info.value)


def test_table_usage_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nope.tsv"
    with usage_error(f"caption table not found: {re.escape(str(missing))}$"):
        CaptionTable(missing, transform)

    table = write_table(tmp_path / "t.tsv", "image\ttext\nx.png\thello\n")
    with usage_error("column 'filepath' not in .*columns: image, text"):
        CaptionTable(table, transform)
    with usage_error("column 'caption' not in .*columns: image, text"):
        CaptionTable(table, transform, img_key="image")
    with usage_error(r"wrong separator\?"):
        CaptionTable(table, transform, img_key="image", caption_key="text", separator=",")
    with usage_error("separator must be a single character"):
        CaptionTable(table, transform, separator="\\t")

    with usage_error("no usable rows"):
        CaptionTable(write_table(tmp_path / "bad.tsv", "filepath\tcaption\nonly-one-field\n"), transform)
    with usage_error("caption table is empty"):
        CaptionTable(write_table(tmp_path / "empty.tsv", ""), transform)


# shard specs


def test_resolve_shard_urls(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    names = [f"train-{i:06d}.tar" for i in range(3)]
    for name in reversed(names):
        write_shard(shards / name, [ok_sample("000", "red")])
    (shards / "notes.txt").write_text("not a shard")
    expected = [str(shards / name) for name in names]

    assert resolve_shard_urls(expected[1]) == [expected[1]]
    assert resolve_shard_urls(str(shards)) == expected
    assert resolve_shard_urls(str(shards / "train-{000000..000002}.tar")) == expected
    assert resolve_shard_urls(f"{expected[2]}::{shards}/train-{{000000..000001}}.tar") == [expected[2], *expected[:2]]


def test_resolve_shard_urls_errors(tmp_path):
    write_shard(tmp_path / "train-000000.tar", [ok_sample("000", "red")])
    (tmp_path / "empty").mkdir()
    with usage_error(f"no .tar shards found in {re.escape(str(tmp_path / 'empty'))}$"):
        resolve_shard_urls(str(tmp_path / "empty"))
    with usage_error(f"shard not found: {re.escape(str(tmp_path / 'other.tar'))}$"):
        resolve_shard_urls(str(tmp_path / "other.tar"))
    with usage_error(re.escape(f"shard not found: {tmp_path / 'train-000001.tar'} (2 of 3 shards missing)")):
        resolve_shard_urls(str(tmp_path / "train-{000000..000002}.tar"))


# shard datasets


@pytest.fixture
def two_shards(tmp_path) -> str:
    """Shard 0: 6 jpg samples, shard 1: 6 png samples; captions 'a COLOUR square KEY'."""
    colours = list(COLOURS)
    for shard, ext in enumerate(("jpg", "png")):
        write_shard(tmp_path / f"s-{shard}.tar",
                    [ok_sample(f"{shard}{i:04d}", colours[i % 3], ext) for i in range(6)])
    return str(tmp_path / "s-{0..1}.tar")


def expected_captions() -> list[str]:
    colours = list(COLOURS)
    return [f"a {colours[i % 3]} square {shard}{i:04d}" for shard in range(2) for i in range(6)]


def test_shards_in_order_every_sample_once(two_shards):
    ds = CaptionShards(two_shards, transform, shuffle=False, shuffle_buffer=BUFFER)
    samples = list(ds)
    assert [s["caption"] for s in samples] == expected_captions()
    for s in samples:
        assert colour_of(s["pixels"]) == s["caption"].split()[1]
    ids = [s["image_id"] for s in samples]
    assert len(set(ids)) == len(ids) and all(0 <= i < 2**63 for i in ids)
    # stable: another instance (as on another rank) gives the same ids
    again = CaptionShards(two_shards, transform, shuffle=False, shuffle_buffer=BUFFER)
    assert [s["image_id"] for s in again] == ids
    assert list(ds.captions()) == expected_captions()
    assert ds.skipped == {}


def test_shards_shuffled_same_set_deterministic_by_seed(two_shards):
    first = [s["caption"] for s in CaptionShards(two_shards, transform, shuffle=True, seed=3, shuffle_buffer=BUFFER)]
    ds = CaptionShards(two_shards, transform, shuffle=True, seed=3, shuffle_buffer=BUFFER)
    again = [s["caption"] for s in ds]
    assert sorted(first) == sorted(expected_captions())
    assert first == again and first != expected_captions()
    next_pass = [s["caption"] for s in ds]
    assert sorted(next_pass) == sorted(first) and next_pass != first


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_split_across_ranks(two_shards, monkeypatch, shuffle):
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        stream = CaptionShards(two_shards, transform, shuffle=shuffle, shuffle_buffer=BUFFER)
        per_rank.append([s["caption"] for s in stream])
    assert all(len(captions) == 6 for captions in per_rank)
    assert sorted(per_rank[0] + per_rank[1]) == sorted(expected_captions())


def test_shards_split_across_loader_workers(two_shards):
    loader = torch.utils.data.DataLoader(CaptionShards(two_shards, transform, shuffle=False, shuffle_buffer=BUFFER),
                                         batch_size=None, num_workers=2)
    assert sorted(s["caption"] for s in loader) == sorted(expected_captions())


def test_corrupt_shard_samples_are_skipped_and_counted(tmp_path, caplog):
    shard = write_shard(tmp_path / "s.tar", [
        ok_sample("0000", "red"),
        {"__key__": "0001", "jpg": b"\xff\xd8 broken jpeg", "txt": "a broken image"},
        {"__key__": "0002", "png": image_bytes("green")},  # no caption
        {"__key__": "0003", "txt": "a caption without an image"},
        {"__key__": "0004", "webp": image_bytes("blue", "WEBP"), "txt": "a blue webp"},
    ])
    ds = CaptionShards(shard, transform, shuffle=False, shuffle_buffer=BUFFER)
    with caplog.at_level(logging.WARNING):
        samples = list(ds)
    assert [s["caption"] for s in samples] == ["a red square 0000", "a blue webp"]
    assert colour_of(samples[1]["pixels"]) == "blue"
    assert ds.skipped == {UNREADABLE_IMAGE: 1, NO_CAPTION: 1, NO_IMAGE: 1}
    assert sum("skipping sample" in r.getMessage() for r in caplog.records) == 3
    # captions() reads only the .txt and .json members, so it never sees that an image is broken
    assert list(ds.captions()) == ["a red square 0000", "a broken image", "a caption without an image", "a blue webp"]
    # evaluation: samples without image or caption never become rows; the broken image is a counted None
    indexed = IndexedShards(shard, transform)
    assert indexed.skipped == {NO_CAPTION: 1, NO_IMAGE: 1} and [caption for _, caption in indexed.rows] == [
        "a red square 0000", "a broken image", "a blue webp"]
    assert indexed[1] is None and indexed.skipped == ds.skipped
    assert colour_of(indexed[2]["pixels"]) == "blue"


def test_truncated_shard_is_skipped_not_fatal(tmp_path, caplog):
    good = write_shard(tmp_path / "a.tar", [ok_sample("0000", "red")])
    write_shard(tmp_path / "b.tar", [ok_sample(f"{i:04d}", "green") for i in range(3)])
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])
    ds = CaptionShards(f"{tmp_path / 'b.tar'}::{good}", transform, shuffle=False, shuffle_buffer=BUFFER)
    with caplog.at_level(logging.WARNING):
        captions = [s["caption"] for s in ds]
    assert captions[-1] == "a red square 0000" and len(captions) < 4
    assert any("unreadable shard data" in r.getMessage() and "b.tar" in r.getMessage() for r in caplog.records)


def test_img2dataset_output_is_read_as_it_is(tmp_path):
    """img2dataset's webdataset layout: 00000.tar with KEY.jpg/.txt/.json, beside 00000_stats.json and .parquet."""
    write_shard(tmp_path / "00000.tar", [
        {"__key__": f"0000000{i}", "jpg": image_bytes(colour, "JPEG"), "txt": f"a {colour} square",
         "json": json.dumps({"url": f"http://x/{i}.jpg", "caption": f"a {colour} square", "status": "success"})}
        for i, colour in enumerate(COLOURS)])
    (tmp_path / "00000_stats.json").write_text("{}")
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")
    streamed = list(CaptionShards(str(tmp_path), transform, shuffle=False, shuffle_buffer=BUFFER))
    assert [(colour_of(s["pixels"]), s["caption"]) for s in streamed] == [(c, f"a {c} square") for c in COLOURS]
    indexed = IndexedShards(str(tmp_path), transform)
    assert [indexed[i]["caption"] for i in range(len(indexed))] == [f"a {c} square" for c in COLOURS]
    assert [colour_of(indexed[i]["pixels"]) for i in range(len(indexed))] == list(COLOURS)


# every rank and worker the same number of batches, whatever the shards hold


def _per_rank(spec: str, monkeypatch, batch_size: int, **kwargs) -> list[list[str]]:
    """The captions each of 2 ranks (1 loader worker each) reads in one pass, after `plan_epoch`."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    read = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        stream = CaptionShards(spec, transform, shuffle=False, shuffle_buffer=BUFFER, batch_size=batch_size,
                               num_workers=1, **kwargs)
        stream.plan_epoch(2)
        read.append([s["caption"] for s in stream])
    return read


def test_uneven_shards_give_every_rank_the_same_number_of_samples(tmp_path, monkeypatch):
    """6 samples in one shard, 2 in the other: dealt out by shard, one rank would run out after 1 batch of 2 while
    the other had 3, and wait for it at every later step. The short rank goes on with the other's shard."""
    write_shard(tmp_path / "a.tar", [ok_sample(f"a{i}", "red") for i in range(6)])
    write_shard(tmp_path / "b.tar", [ok_sample(f"b{i}", "green") for i in range(2)])
    read = _per_rank(f"{tmp_path / 'a.tar'}::{tmp_path / 'b.tar'}", monkeypatch, batch_size=2)
    assert [len(r) for r in read] == [4, 4]  # 8 samples over 2 ranks in batches of 2: 2 batches each
    assert read[1][:2] == ["a green square b0", "a green square b1"]  # its own shard first, then borrowed ones
    assert all(caption.startswith("a red square a") for caption in read[1][2:])


def test_a_rank_whose_only_shard_is_unreadable_borrows_and_trains(tmp_path, monkeypatch, caplog):
    write_shard(tmp_path / "a.tar", [ok_sample(f"a{i}", "red") for i in range(4)])
    (tmp_path / "b.tar").write_text("not a tar file")
    with caplog.at_level(logging.WARNING):
        read = _per_rank(f"{tmp_path / 'a.tar'}::{tmp_path / 'b.tar'}", monkeypatch, batch_size=2)
    assert [len(r) for r in read] == [2, 2]  # 4 readable samples over 2 ranks
    assert sum("b.tar" in r.getMessage() for r in caplog.records) == 1  # logged once, not at every visit


def test_an_epoch_size_is_kept_exactly_by_finite_readers(tmp_path, monkeypatch):
    write_shard(tmp_path / "a.tar", [ok_sample(f"a{i}", "red") for i in range(3)])
    write_shard(tmp_path / "b.tar", [ok_sample(f"b{i}", "green") for i in range(3)])
    read = _per_rank(f"{tmp_path / 'a.tar'}::{tmp_path / 'b.tar'}", monkeypatch, batch_size=2, epoch_samples=10)
    assert [len(r) for r in read] == [6, 6]  # ceil(10 / (2 ranks x 2)) = 3 batches of 2 each, borrowing to get there


def test_shard_sample_counts_come_from_stats_files_or_the_tar_headers(tmp_path):
    write_shard(tmp_path / "000000.tar", [ok_sample(f"{i}", "red") for i in range(3)]
                + [{"__key__": "x", "txt": "no image"}])
    assert shard_sample_count(str(tmp_path / "000000.tar")) == 3  # samples with an image
    (tmp_path / "000000_stats.json").write_text(json.dumps({"images": 7}))  # data_prep's
    assert shard_sample_count(str(tmp_path / "000000.tar")) == 7
    (tmp_path / "000000_stats.json").write_text(json.dumps({"successes": 5, "failed_to_download": 2}))  # img2dataset
    assert shard_sample_count(str(tmp_path / "000000.tar")) == 5
    (tmp_path / "broken.tar").write_text("no tar")
    assert shard_sample_count(str(tmp_path / "broken.tar")) == 0


def test_several_readers_of_remote_shards_need_an_epoch_size():
    stream = CaptionShards("pipe:cat a.tar::pipe:cat b.tar", transform, shuffle=True, shuffle_buffer=BUFFER,
                           num_workers=2)
    with usage_error("give --train-num-samples"):
        stream.plan_epoch(1)


def test_training_on_a_table_replaces_an_unreadable_image_by_the_next_readable_one(tmp_path):
    """So that no batch is ever empty: under DDP an empty batch on one rank would leave the others waiting."""
    (tmp_path / "good.png").write_bytes(image_bytes("green"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    table = CaptionTable(write_table(tmp_path / "t.tsv", "filepath\tcaption\nbad.png\tbad\nbad.png\tbad again\n"
                                                         "good.png\tgood\n"), transform)
    training = _Substituting(table)
    assert [training[i]["caption"] for i in range(3)] == ["good", "good", "good"]
    (tmp_path / "good.png").write_bytes(b"broken since")
    with usage_error("none of the 3 training samples can be read any more"):
        training[0]
