"""Evaluation datasets: labelled images for classification tasks, captioned images for retrieval.

Every dataset yields (PIL image, target), None for a sample left out (an unreadable image, a shard sample that
samples.py skips), counted where the batches are made (embed.encode_images), or NO_CLASS for an image that is not
part of a labelled task (a synthetic two-object scene); the model's own preprocessing is applied later (see
embed.Preprocess), so one opened dataset serves every model of a comparison.

DATA: `synthetic` (labels colour/shape, one caption per image), `imagefolder:DIR`, `cifar10:ROOT`,
`cifar100:ROOT`, a caption table (`.tsv`/`.csv`, split as in training), or webdataset shards (a `.tar`, a
directory, a brace pattern), whose samples (captions, labels, what is skipped) are data/samples.py's.
"""
from __future__ import annotations

import logging
import math
import tarfile
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Subset, get_worker_info
from torchvision import datasets
from torchvision.transforms.functional import to_pil_image

from clipfromscratch.data.samples import (
    UNREADABLE,
    UNREADABLE_IMAGE,
    SkipCounts,
    SkippedSample,
    open_rgb,
    read_sample,
    sample_label,
    sample_meta,
)
from clipfromscratch.data.shards import is_remote, resolve_shard_urls
from clipfromscratch.data.specs import LABELLED, parse_data_spec, refuse
from clipfromscratch.data.synthetic import SyntheticCaptions
from clipfromscratch.data.tsv import CaptionTable
from clipfromscratch.errors import UsageError, first_line
from clipfromscratch.eval.templates import read_lines
from clipfromscratch.eval.zeroshot import Template

log = logging.getLogger(__name__)
SYNTHETIC_SIDE = 64  # rendered once for every model, each resizes to its own input
SYNTHETIC_SAMPLES = 1000
CIFAR = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
UNREADABLE_SHARD = "unreadable shard"


class NoClass:
    """The type of NO_CLASS."""


NO_CLASS = NoClass()  # left out of a labelled task like None, but not counted as skipped: nothing is wrong with it


@dataclass
class LabelledImages:
    """Images with a class each, for zeroshot, linear_probe, class_agnostic and cluster."""

    classnames: list[str]
    test: Dataset  # (image, class index)
    train: Dataset | None  # probes fit here; None: the probe splits `test` itself
    templates: list[Template] | None = None  # the data's own prompt ensemble, if it has one


class _Synthetic(Dataset):
    """The synthetic data with one label as target (two-object scenes have no class: None), or with its caption."""

    def __init__(self, source: SyntheticCaptions, target: str):
        self.source = source
        self.target = target  # "caption" or a label name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Image.Image, int | list[str]] | NoClass:
        sample = self.source[index]
        if self.target == "caption":
            return sample["pixels"], [sample["caption"]]
        label = sample["labels"][self.target]
        return NO_CLASS if label < 0 else (sample["pixels"], label)


class _Shards(IterableDataset):
    """(image, target) from shards in order: the captions, or with `label` the class index of that label.

    Samples left out by samples.py's rule give None and are counted in `skipped` (by each loader worker in its own
    copy), as is a shard that fails part-way, whose stream then goes on with the next shard. With loader workers
    each reads its share of the shards and stops at its share of `limit`, skipped samples included.
    """

    def __init__(self, urls: list[str], limit: int | None, label: str | None = None,
                 classnames: list[str] | None = None):
        self.urls = urls
        self.limit = limit
        self.label = label
        self.class_index = {name: i for i, name in enumerate(classnames or [])}
        self.skipped = SkipCounts()

    def __iter__(self):
        urls = wds.split_by_worker(self.urls)
        worker = get_worker_info()
        limit = self.limit if self.limit is None or worker is None else math.ceil(self.limit / worker.num_workers)
        samples = wds.tarfile_samples(({"url": url} for url in urls), handler=self._unreadable_shard)
        for count, raw in enumerate(samples):
            if limit is not None and count >= limit:
                return
            read = read_sample(raw, self.skipped, self.label)
            if read is None:
                yield None
                continue
            sample, pixels = read
            target = sample.captions if self.label is None else self.class_index[str(sample.label)]
            yield to_pil_image(pixels), target

    def _unreadable_shard(self, exn: Exception) -> bool:
        """webdataset's error handler: count the shard, go on with the next (webdataset appends the url to args)."""
        url = next((arg for arg in reversed(exn.args) if isinstance(arg, str)), "a shard")
        reason = exn.args[0] if exn.args and isinstance(exn.args[0], str) else first_line(exn)
        self.skipped.add(UNREADABLE_SHARD, f"the rest of {url}", f"{type(exn).__name__}: {reason}")
        return True


def readable_shards(spec: str) -> list[str]:
    """The shards SPEC names, but for local files that do not open as tar archives (not a tar, empty): those are
    left out with one warning, and when no shard opens, that is a one-line error with the counts. A shard damaged
    further in is found while it is read (see _Shards)."""
    urls = resolve_shard_urls(spec)
    unreadable = {}
    for url in urls:
        if is_remote(url):
            continue
        try:
            with tarfile.open(url, "r|*") as tar:  # as webdataset opens it: a stream, compressed or not
                tar.next()
        except (tarfile.TarError, OSError) as err:
            unreadable[url] = first_line(err)
    if unreadable:
        url, reason = next(iter(unreadable.items()))
        example = f"(e.g. {url}: {reason})"
        if len(unreadable) == len(urls):
            raise UsageError(f"no readable shards in {spec}: {len(urls)} of {len(urls)} do not open as tar files "
                             f"{example}")
        log.warning("skipping %d of %d shards that do not open as tar files %s", len(unreadable), len(urls), example)
    return [url for url in urls if url not in unreadable]


def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of `limit` samples (all when None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, order.sort().values.tolist())


def _read_classnames(path: str, expected: int) -> list[str]:
    names = read_lines(path, "class names")
    if len(names) != expected:
        raise UsageError(f"{path} has {len(names)} class names, the data has {expected} classes")
    return names


def _imagefolder(root: str, classnames_file: str | None, limit: int | None, seed: int) -> LabelledImages:
    try:
        folder = datasets.ImageFolder(root)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise UsageError(f"imagefolder:{root}: {err}") from None
    names = (_read_classnames(classnames_file, len(folder.classes)) if classnames_file
             else [c.replace("_", " ") for c in folder.classes])
    # read by ImageFiles, which counts an unreadable file where ImageFolder would stop at it
    images = ImageFiles([path for path, _ in folder.samples], [target for _, target in folder.samples])
    return LabelledImages(names, _subset(images, limit, seed), None)


def _cifar(name: str, root: str, limit: int | None, seed: int, download: bool) -> LabelledImages:
    try:
        splits = {train: CIFAR[name](root, train=train, download=download) for train in (True, False)}
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        hint = "" if download else " (add --download to fetch it)"
        raise UsageError(f"{name}:{root}: {err}{hint}") from None
    return LabelledImages(splits[False].classes, _subset(splits[False], limit, seed),
                          _subset(splits[True], limit, seed))


def _shard_labels(spec: str, label: str, limit: int | None) -> LabelledImages:
    urls = readable_shards(spec)
    values = set()
    # a shard that fails part-way is counted when its images are read
    for raw in wds.tarfile_samples(({"url": url} for url in urls), handler=wds.ignore_and_continue,
                                   select_files=lambda n: n.endswith(".json")):
        try:
            value = sample_label(sample_meta(raw), label)
        except SkippedSample:  # malformed KEY.json: counted when the images are read
            continue
        if value is not None:
            values.add(str(value))
    if not values:
        raise UsageError(f"no sample in {spec} has '{label}' in its KEY.json")
    classnames = sorted(values)
    return LabelledImages(classnames, _Shards(urls, limit, label, classnames), None)


def open_labelled(spec: str, label: str | None = None, classnames_file: str | None = None,
                  num_samples: int | None = None, seed: int = 0, download: bool = False) -> LabelledImages:
    """The labelled images DATA names; `label` picks the synthetic attribute or the KEY.json field of shards."""
    data = parse_data_spec(spec)
    if data.kind == "synthetic" and not data.where:
        tasks = SyntheticCaptions.zeroshot_tasks
        if label not in tasks:
            raise UsageError(f"synthetic data has the labels {', '.join(tasks)}: choose one with --label")
        classnames, templates = tasks[label]
        n = num_samples or SYNTHETIC_SAMPLES
        split = {s: _Synthetic(SyntheticCaptions(s, n, seed, SYNTHETIC_SIDE), label) for s in ("train", "val")}
        return LabelledImages(list(classnames), split["val"], split["train"], list(templates))
    if data.kind == "imagefolder":
        return _imagefolder(data.where, classnames_file, num_samples, seed)
    if data.kind in CIFAR:
        return _cifar(data.kind, data.where, num_samples, seed, download)
    if data.kind == "table":
        raise UsageError(f"{spec} is a caption table: it has no labels (use it with the retrieval task)")
    if data.kind != "shards":
        raise refuse(data, "a labelled task", "synthetic, imagefolder:DIR, cifar10:ROOT, cifar100:ROOT or shards")
    if label is None:
        raise UsageError(f"{spec}: give --label, the KEY.json field that holds each image's class")
    return _shard_labels(spec, label, num_samples)


class ImageFiles(Dataset):
    """(PIL image, target) for image files and one target each; None for a file that cannot be read, counted in
    `skipped` (by each loader worker in its own copy)."""

    def __init__(self, paths: list[str], targets: list):
        self.paths = paths
        self.targets = targets
        self.skipped = SkipCounts()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, object] | None:
        try:
            return open_rgb(self.paths[index]), self.targets[index]
        except UNREADABLE as exn:
            self.skipped.add(UNREADABLE_IMAGE, f"image {self.paths[index]}", exn)
            return None


def open_captioned(spec: str, num_samples: int | None = None, seed: int = 0) -> Dataset:
    """(image, its captions) for every distinct image DATA names, for retrieval."""
    data = parse_data_spec(spec)
    if data.kind == "synthetic" and not data.where:
        return _Synthetic(SyntheticCaptions("val", num_samples or SYNTHETIC_SAMPLES, seed, SYNTHETIC_SIDE), "caption")
    if data.kind in LABELLED:
        raise UsageError(f"{spec} has labels but no captions: retrieval needs a caption table, shards or synthetic")
    if data.kind not in ("table", "shards"):
        raise refuse(data, "a captioned task", "synthetic, a caption table or shards")
    if data.kind == "table":
        table = CaptionTable(spec, None)
        # the distinct images of the table, each with all of its captions
        return _subset(ImageFiles(table.image_paths, table.captions_per_image()), num_samples, seed)
    return _Shards(readable_shards(spec), num_samples)
