"""data_prep: COCO, Fashion and caption tables -> shards, checked member by member; re-runs, crashes, bad input;
then the shards through the DataModule (workers, ranks) and a short training run."""
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipfromscratch.cli import main as train_main
from clipfromscratch.config import DataConfig
from clipfromscratch.data.datamodule import CaptionDataModule
from clipfromscratch.data.shards import CaptionShards, resolve_shard_urls
from clipfromscratch.errors import UsageError
from clipfromscratch.eval.retrieval import first_occurrences
from clipfromscratch.prep import captioned, coco, fashion, writer
from clipfromscratch.text_tokenizers import make_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30),
           "purple": (150, 40, 190), "white": (250, 250, 250)}
MAX_SIZE = 48
PREP = ["--workers", "2", "--max-size", str(MAX_SIZE), "--shard-size", "4"]
BUFFER = DataConfig.shuffle_buffer


def save(path, colour: str, size=(40, 30), fmt="JPEG", mode="RGB") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.new("RGB", size, COLOURS[colour])
    if mode == "RGBA":  # left half transparent
        image = image.convert("RGBA")
        image.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, fmt)


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def shard_samples(folder) -> dict[str, dict]:
    """{key: {ext: bytes}} of every shard in a split folder, checking keys are unique."""
    samples = {}
    for url in resolve_shard_urls(str(folder)):
        with tarfile.open(url) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def pixel(jpg: bytes, xy) -> tuple:
    with Image.open(io.BytesIO(jpg)) as image:
        assert image.mode == "RGB" and image.format == "JPEG"
        return image.getpixel(xy)


def near(rgb, colour: str, tol=40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(rgb, COLOURS[colour]))


def folder_state(root) -> dict:
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_mtime_ns, Path(d, f).read_bytes())
            for d, _, files in os.walk(root) for f in files}


# COCO: 10 train images (ids 1..10), 8 val images (ids 101..108), two or three captions each


@pytest.fixture(scope="module")
def coco_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    colours = list(COLOURS)
    for part, ids in (("train", range(1, 11)), ("val", range(101, 109))):
        images, annotations = [], []
        for n, image_id in enumerate(ids):
            colour = colours[n % len(colours)]
            name = f"COCO_{part}2014_{image_id:012d}.jpg"
            if image_id == 3:
                name = name.replace(".jpg", ".png")
                save(root / "images" / f"{part}2014" / name, colour, fmt="PNG", mode="RGBA")
            elif image_id != 4:  # 4 is missing
                save(root / "images" / f"{part}2014" / name, colour, size=(400, 300) if image_id == 5 else (40, 30),
                     mode={6: "L", 7: "CMYK"}.get(image_id, "RGB"))
            if image_id == 8:
                truncate(root / "images" / f"{part}2014" / name)
            images.append({"id": image_id, "file_name": name, "width": 40, "height": 30})
            for k in range(3 if image_id % 2 else 2):
                annotations.append({"id": image_id * 10 + k, "image_id": image_id,
                                    "caption": f" a {colour} picture number {k} "})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{part}2014.json").write_text(
            json.dumps({"images": images, "annotations": annotations}))
    karpathy = {"images": [{"cocoid": i, "split": s} for i, s in
                           [(1, "train"), (2, "train"), (5, "train"), (6, "restval"), (101, "restval"),
                            (102, "val"), (103, "val"), (104, "test"), (105, "test"), (999, "test")]]}
    (root / "dataset_coco.json").write_text(json.dumps(karpathy))
    return root


def coco_args(raw, out, *extra) -> list[str]:
    return ["--annotations", str(raw / "annotations"), "--images", str(raw / "images"), "--output", str(out),
            *PREP, *extra]


@pytest.fixture(scope="module")
def coco_out(coco_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco-shards")
    assert coco.main(coco_args(coco_raw, out)) == 0
    return out


def test_coco_prep_exact_contents_and_stats(coco_out):
    train = shard_samples(coco_out / "train")
    # ids 4 (missing) and 8 (truncated) are skipped and counted, never padded
    assert sorted(train) == [f"{i:012d}" for i in (1, 2, 3, 5, 6, 7, 9, 10)]
    assert sorted(os.listdir(coco_out / "train")) == [
        "000000.tar", "000000_stats.json", "000001.tar", "000001_stats.json", "000002.tar", "000002_stats.json",
        "stats.json"]
    meta = json.loads(train["000000000005"]["json"])
    assert meta == {"image_id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 400, "height": 300,
                    "captions": ["a purple picture number 0", "a purple picture number 1", "a purple picture number 2"]}
    assert train["000000000005"]["txt"] == b"a purple picture number 0"
    with Image.open(io.BytesIO(train["000000000005"]["jpg"])) as image:
        assert image.size == (MAX_SIZE, 36)  # capped, aspect kept
    for key, colour in (("000000000001", "red"), ("000000000006", "white"), ("000000000007", "red")):
        assert near(pixel(train[key]["jpg"], (20, 15)), colour), key  # grayscale and CMYK are RGB now
    png = train["000000000003"]["jpg"]  # PNG with alpha: transparent half on white
    assert near(pixel(png, (5, 15)), "white") and near(pixel(png, (35, 15)), "blue")

    stats = json.loads((coco_out / "train" / "stats.json").read_text())
    assert stats["images"] == 8 and stats["captions"] == 3 + 2 + 3 + 3 + 2 + 3 + 2 + 3
    assert stats["skipped"] == {"missing image": 1, "unreadable image": 1} and stats["shards"] == 3
    assert stats["source"] == {"images in the annotations": 18, "images without captions": 0}
    # no Karpathy file: the official val set is cut into test and val, four each
    val, test = shard_samples(coco_out / "val"), shard_samples(coco_out / "test")
    assert len(val) == len(test) == 4 and sorted(val.keys() | test.keys()) == [f"{i:012d}" for i in range(101, 109)]
    assert json.loads((coco_out / "test" / "stats.json").read_text())["captions"] == sum(
        len(json.loads(s["json"])["captions"]) for s in test.values())


def test_coco_karpathy_split(coco_raw, tmp_path):
    assert coco.main(coco_args(coco_raw, tmp_path, "--karpathy", str(coco_raw / "dataset_coco.json"))) == 0
    keys = {split: sorted(int(k) for k in shard_samples(tmp_path / split)) for split in ("train", "val", "test")}
    assert keys == {"train": [1, 2, 5, 6, 101], "val": [102, 103], "test": [104, 105]}
    source = json.loads((tmp_path / "test" / "stats.json").read_text())["source"]
    assert source["Karpathy images not in the annotations"] == 1
    assert source["annotated images not in the Karpathy split"] == 18 - 9


def test_rerun_changes_nothing(coco_raw, coco_out, capsys):
    before = folder_state(coco_out)
    assert coco.main(coco_args(coco_raw, coco_out)) == 0
    assert folder_state(coco_out) == before
    assert "train          3     0" in capsys.readouterr().out  # 3 shards, none new


def test_interrupted_prep_leaves_no_trusted_partial_shard(coco_raw, coco_out, tmp_path, monkeypatch, capsys):
    encode = writer.encode_image

    def crash_on_image_6(path, max_size):
        if path.endswith("000000000006.jpg"):
            raise RuntimeError("simulated crash")
        return encode(path, max_size)

    monkeypatch.setattr(writer, "encode_image", crash_on_image_6)  # worker processes are forked: they see it too
    with pytest.raises(RuntimeError, match="simulated crash"):
        coco.main(coco_args(coco_raw, tmp_path))
    # image 6 is the 2nd item of shard 1: that shard never got its final name; any shard that did is whole
    assert not (tmp_path / "train" / "000001.tar").exists()
    reference = shard_samples(coco_out / "train")
    for url in resolve_shard_urls(str(tmp_path / "train")) if any((tmp_path / "train").glob("*.tar")) else []:
        with tarfile.open(url) as tar:
            assert all(tar.extractfile(m).read() == reference[m.name.split(".")[0]][m.name.split(".", 1)[1]]
                       for m in tar)

    def die_on_image_6(path, max_size):
        if path.endswith("000000000006.jpg"):
            os._exit(1)  # a worker killed mid-shard (e.g. out of memory)
        return encode(path, max_size)

    monkeypatch.setattr(writer, "encode_image", die_on_image_6)
    capsys.readouterr()
    assert coco.main(coco_args(coco_raw, tmp_path)) == 2
    assert capsys.readouterr().err.strip() == (
        "error: a worker process died (killed, or out of memory?): run again to continue, finished shards are kept")

    monkeypatch.setattr(writer, "encode_image", encode)
    assert coco.main(coco_args(coco_raw, tmp_path)) == 0  # the next run finishes the job, byte for byte
    ours = {os.path.relpath(k, tmp_path): v[1] for k, v in folder_state(tmp_path).items()}
    assert ours == {os.path.relpath(k, coco_out): v[1] for k, v in folder_state(coco_out).items()}


# Fashion: styles.csv in the real format, 30 products


STYLES_HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"


@pytest.fixture(scope="module")
def fashion_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    colours = list(COLOURS)
    rows = []
    for n in range(30):
        product_id = 1000 + n
        colour = colours[n % len(colours)]
        article = "Tshirts" if n < 12 else ("Watches", "Jeans", "Sandals")[n % 3]
        name = f"Brand {colour.title()} {article} {n}"
        if n == 7:
            name = "Puma Men, Women Red, Black Sneakers"  # unquoted commas, as in the real file
        rows.append(f"{product_id},Men,Apparel,Topwear,{article},{colour.title()},Summer,2012,Casual,{name}\n")
        if n == 9:
            continue  # no image file
        save(root / "images" / f"{product_id}.jpg", colour, size=(30, 40))
        if n == 11:
            truncate(root / "images" / f"{product_id}.jpg")
    rows.insert(5, "2000,Men,Apparel\n")  # cannot be parsed
    (root / "styles.csv").write_text(STYLES_HEADER + "".join(rows))
    return root


def test_fashion_prep_exact(fashion_raw, tmp_path):
    args = ["--styles", str(fashion_raw / "styles.csv"), "--images", str(fashion_raw / "images"),
            "--output", str(tmp_path), *PREP]
    assert fashion.main(args) == 0
    splits = {split: shard_samples(tmp_path / split) for split in ("train", "val", "test")}
    stats = {split: json.loads((tmp_path / split / "stats.json").read_text()) for split in splits}
    # 12 T-shirts form a stratum (round(1.2) = 1 test, 1 val); the 18 others are pooled (2 test, 2 val)
    assigned = {split: stats[split]["images"] + sum(stats[split]["skipped"].values()) for split in splits}
    assert assigned == {"train": 24, "val": 3, "test": 3}
    for split in ("val", "test"):
        articles = [json.loads(s["json"])["labels"]["articleType"] for s in splits[split].values()]
        assert articles.count("Tshirts") in (0, 1) and articles.count("Tshirts") + sum(
            stats[split]["skipped"].values()) >= 1
    everything = {k: v for samples in splits.values() for k, v in samples.items()}
    assert sorted(everything) == sorted(str(1000 + n) for n in range(30) if n not in (9, 11))
    assert sum(sum(s["skipped"].values()) for s in stats.values()) == 2
    assert {reason for s in stats.values() for reason in s["skipped"]} == {"missing image", "unreadable image"}
    assert stats["train"]["source"] == {"rows": 31, "unparseable rows": 1, "names with unquoted commas recovered": 1}
    recovered = json.loads(everything["1007"]["json"])
    assert recovered == {"id": 1007, "captions": ["Puma Men, Women Red, Black Sneakers"], "width": 30, "height": 40,
                         "labels": {"gender": "Men", "masterCategory": "Apparel", "subCategory": "Topwear",
                                    "articleType": "Tshirts", "baseColour": "Green", "season": "Summer",
                                    "usage": "Casual"}}
    # a small RGB JPEG is stored as it was (already small: re-encoding would only lose quality)
    assert everything["1000"]["jpg"] == (fashion_raw / "images" / "1000.jpg").read_bytes()


def test_tsv_to_shards_groups_captions_by_image(tmp_path):
    for colour in ("red", "green"):
        save(tmp_path / "img" / f"{colour}.jpg", colour)
    (tmp_path / "pairs.csv").write_text("filepath,caption\nimg/red.jpg,a red one\nimg/green.jpg,a green one\n"
                                        "img/red.jpg,red again\nbad row without a caption\n")
    assert captioned.main(["--input", str(tmp_path / "pairs.csv"), "--output", str(tmp_path / "out"), *PREP]) == 0
    samples = shard_samples(tmp_path / "out" / "train")
    assert {k: json.loads(v["json"]) for k, v in samples.items()} == {
        "000000000": {"file_name": "img/red.jpg", "captions": ["a red one", "red again"], "width": 40, "height": 30},
        "000000001": {"file_name": "img/green.jpg", "captions": ["a green one"], "width": 40, "height": 30}}
    stats = json.loads((tmp_path / "out" / "train" / "stats.json").read_text())
    assert stats["source"] == {"rows": 3, "malformed rows": 1}


@pytest.mark.parametrize("which, args, message", [
    ("coco", ["--annotations", "{tmp}/nope", "--images", "{tmp}"], "annotations folder not found: {tmp}/nope"),
    ("coco", ["--annotations", "{tmp}", "--images", "{tmp}"], "no captions_train<YEAR>.json and captions_val<YEAR>"),
    ("coco", ["--annotations", "{tmp}/ann", "--images", "{tmp}"], "is not valid JSON"),
    ("coco", ["--annotations", "{tmp}/ann", "--images", "{tmp}", "--year", "2017"], "no captions_train2017.json"),
    ("fashion", ["--styles", "{tmp}/styles.csv", "--images", "{tmp}"], "styles file not found: {tmp}/styles.csv"),
    ("fashion", ["--styles", "{tmp}/ann/captions_val2014.json", "--images", "{tmp}"], "does not start with the styl"),
    ("tsv", ["--input", "{tmp}/t.tsv"], "caption table not found: {tmp}/t.tsv"),
    ("tsv", ["--input", "{tmp}/ann/captions_val2014.json", "--shard-size", "0"], "--shard-size must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, which, args, message):
    for folder in ("ann", "train2014", "val2014"):
        (tmp_path / folder).mkdir()
    (tmp_path / "ann" / "captions_train2014.json").write_text("{not json")
    (tmp_path / "ann" / "captions_val2014.json").write_text("{}")
    command = {"coco": coco.main, "fashion": fashion.main, "tsv": captioned.main}[which]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert command([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err and "\n" not in err, err


def test_the_output_is_checked_before_the_source_is_read(tmp_path, unwritable_dir, capsys):
    # the table does not exist: a run that read it first would say so instead
    assert captioned.main(["--input", str(tmp_path / "missing.tsv"), "--output", f"{unwritable_dir}/out"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --output {unwritable_dir}/out: cannot write there")


def test_a_shard_whose_stats_are_damaged_is_written_again(coco_raw, coco_out, tmp_path, capsys):
    shutil.copytree(coco_out, tmp_path / "out")
    stats = tmp_path / "out" / "train" / "000001_stats.json"
    stats.write_text("{trunc")
    assert coco.main(coco_args(coco_raw, tmp_path / "out")) == 0
    assert "train          3     1" in capsys.readouterr().out  # 3 shards, 1 of them written again
    assert folder_state(tmp_path / "out").keys() == {
        path.replace(str(coco_out), str(tmp_path / "out")) for path in folder_state(coco_out)}
    assert stats.read_text() == (coco_out / "train" / "000001_stats.json").read_text()


def test_changed_settings_are_refused(coco_raw, coco_out):
    with pytest.raises(UsageError, match="holds shards made with other settings"):
        writer.prepare_split("train", [writer.Item("1", "x.jpg", ("x",))] * 10, str(coco_out / "train"),
                           shard_size=4, max_size=99, workers=1, source={})


# the shards in training and validation


class TinyModel:
    """What the DataModule asks of a model: the tower's size and statistics, preprocessing, the tokenizer."""

    def __init__(self, tokenizer):
        from clipfromscratch.data.transforms import image_transform
        self.image_tower = type("Tower", (), {"image_size": 16, "mean": (0.5,) * 3, "std": (0.25,) * 3})()
        self.preprocess = image_transform(16, (0.5,) * 3, (0.25,) * 3, train=False)
        self.tokenizer = tokenizer
        self.config = type("Config", (), {"context_length": 16})()


def datamodule(train: str, val: str | None) -> CaptionDataModule:
    dm = CaptionDataModule(DataConfig(train_data=train, val_data=val, batch_size=3, num_workers=2), image_size=16,
                           seed=0)
    dm.bind(TinyModel(make_tokenizer("bert", False, "tiny", dm.train_captions())))
    return dm


def test_validation_covers_every_caption_once_with_workers_and_ranks(coco_out):
    dm = datamodule(str(coco_out / "train"), str(coco_out / "val"))
    expected = sorted(c for s in shard_samples(coco_out / "val").values() for c in json.loads(s["json"])["captions"])
    rows = dm.val_set.rows
    assert sorted(caption for _, caption in rows) == expected and len(rows) == 10  # 4 images, 2 or 3 captions each

    def check(batches: list[dict]) -> torch.Tensor:
        """Each row carries its own caption and its image's id; returns the sample indices."""
        for b in batches:
            assert b["pixels"].shape[1:] == (3, 16, 16)
            texts = dm.collate.tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)
            assert texts == [rows[i][1] for i in b["index"].tolist()]
            assert b["image_id"].tolist() == [rows[i][0] for i in b["index"].tolist()]
        return torch.cat([b["index"] for b in batches])

    assert sorted(check(list(dm.val_dataloader())).tolist()) == list(range(10))  # 2 workers
    # 2 ranks, as Lightning sets them up: a distributed sampler that pads to equal shares with duplicates
    loader = dm.val_dataloader()
    gathered = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=False)
        gathered += torch.utils.data.DataLoader(loader.dataset, batch_size=2, sampler=sampler,
                                                collate_fn=loader.collate_fn, num_workers=2)
    index = check(gathered)
    assert len(index) == 10
    assert sorted(index[first_occurrences(index)[0]].tolist()) == list(range(10))

    odd = dm.val_set
    odd.rows = rows[:9]  # 9 rows over 2 ranks: the sampler pads with a duplicate that validation drops
    index = torch.cat([torch.tensor(list(torch.utils.data.DistributedSampler(odd, 2, r, shuffle=False)))
                       for r in range(2)])
    assert len(index) == 10 and sorted(index[first_occurrences(index)[0]].tolist()) == list(range(9))


def test_training_stream_splits_by_rank_and_worker(coco_out, monkeypatch):
    spec = str(coco_out / "train")  # 3 shards, 8 images
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        seen += [s["image_id"] for s in CaptionShards(spec, None, shuffle=True, shuffle_buffer=BUFFER,
                                                      num_workers=1)]
    assert len(seen) == 8 and len(set(seen)) == 8  # every image once per epoch over both ranks

    with pytest.raises(UsageError, match="3 training shards for 4 readers .2 ranks x 2 workers.: use "):
        CaptionShards(spec, None, shuffle=True, shuffle_buffer=BUFFER, num_workers=2).check_readers(2)

    # resampled: every rank and worker yields exactly its share of the epoch, rounded up to whole batches
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        stream = CaptionShards(spec, None, shuffle=True, shuffle_buffer=BUFFER, resampled=True, epoch_samples=50,
                               batch_size=4, num_workers=2)
        assert len(stream) == 32  # per rank: ceil(50 / (2 ranks x 2 workers x 4)) = 4 batches of 4 per worker
        for worker in range(2):
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            assert len(list(stream)) == 16


def test_training_draws_a_random_caption_per_visit(coco_out):
    stream = CaptionShards(str(coco_out / "train" / "000000.tar"), None, shuffle=True, shuffle_buffer=BUFFER)
    drawn = {}
    for _ in range(12):
        for sample in stream:
            drawn.setdefault(sample["caption"].split()[1], set()).add(sample["caption"])
    # image 1 (red) has three captions, image 2 (green) two: all of them come up over the passes
    assert drawn["red"] == {f"a red picture number {k}" for k in range(3)}
    assert drawn["green"] == {f"a green picture number {k}" for k in range(2)}


@pytest.mark.slow
def test_train_on_prepared_shards_learns(tmp_path, capsys):
    colours = list(COLOURS)
    for split, count in (("train", 96), ("val", 24)):
        lines = ["filepath\tcaption"]
        for n in range(count):
            colour = colours[n % len(colours)]
            save(tmp_path / split / f"{n}.jpg", colour, size=(32 + n % 9, 32))
            lines.append(f"{split}/{n}.jpg\ta {colour} square")
        (tmp_path / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        assert captioned.main(["--input", str(tmp_path / f"{split}.tsv"), "--output", str(tmp_path / "shards"),
                               "--split", split, "--workers", "2", "--shard-size", "16"]) == 0
    run = tmp_path / "run"
    assert train_main(["--train-data", str(tmp_path / "shards" / "train"), "--val-data",
                       str(tmp_path / "shards" / "val"), "--image-size", "32", "--batch-size", "24", "--max-steps",
                       "40", "--val-every-n-steps", "40", "--warmup-steps", "10", "--lr", "2e-3", "--num-workers",
                       "2", "--embed-dim", "32", "--output-dir", str(run), "--text-pooling", "mean"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # 24 images of 6 colours, 4 per caption: a model that knows colours gets caption -> image Recall@1 of 1/4;
    # chance is 1/24
    assert metrics["image_retrieval_recall@1"] >= 0.2, metrics
    assert metrics["text_retrieval_recall@5"] >= 0.8 and metrics["image_retrieval_recall@5"] >= 0.8, metrics
    # the tokenizer was trained from the shard captions and cached beside the shards; the next run reuses it
    cache = tmp_path / "shards" / "train" / "tokenizers"
    [fingerprint] = os.listdir(cache)
    [cached] = os.listdir(cache / fingerprint)
    assert cached.startswith("wordpiece-")

    def no_captions():
        raise AssertionError("retrained instead of reusing the cache")
        yield

    reused = make_tokenizer("bert", False, "tiny", no_captions(), str(cache / fingerprint))
    assert reused.tokenize("a purple square") == ["a", "purple", "square"]
