"""Webdataset shards for training, streamed; what a sample is, and which are skipped, is samples.py's rule.

When a sample has several captions (COCO's five per image in KEY.json), each visit of the image draws one of
them at random.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import braceexpand
import torch
import webdataset as wds

from clipfromscratch.data.samples import (
    IMAGE_EXTENSIONS,
    TEXT_EXTENSIONS,
    SkipCounts,
    SkippedSample,
    read_sample,
    sample_captions,
)
from clipfromscratch.errors import UsageError

log = logging.getLogger(__name__)


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def resolve_shard_urls(spec: str) -> list[str]:
    """The shards a SPEC names: a .tar file, a directory of .tar files, a brace pattern, or a `::` list of these."""
    urls = []
    for url in (url for part in spec.split("::") for url in braceexpand.braceexpand(part)):
        if os.path.isdir(url):
            found = sorted(glob.glob(os.path.join(glob.escape(url), "*.tar")))
            if not found:
                raise UsageError(f"no .tar shards found in {url}")
            urls.extend(found)
        else:
            urls.append(url)
    missing = [url for url in urls if not is_remote(url) and not os.path.isfile(url)]
    if len(missing) == 1:
        raise UsageError(f"shard not found: {missing[0]}")
    if missing:
        raise UsageError(f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} shards missing)")
    return urls


def _image_id(url: str, key: str) -> int:
    digest = hashlib.blake2b(f"{url}\n{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits, so it fits a signed int64 tensor


def shard_error(exn: Exception) -> bool:
    """webdataset's error handler for shards that can't be opened or read: warn and go on with the rest."""
    where = "; ".join(arg for arg in exn.args if isinstance(arg, str))
    log.warning("skipping unreadable shard data: %s: %s", type(exn).__name__, where)
    return True


# the per-shard statistics written beside each shard, and their count of samples: data_prep's, img2dataset's
STATS_COUNTS = ("images", "successes")


def shard_sample_count(url: str) -> int:
    """The samples with an image in a local shard: from the statistics file beside it (data_prep and img2dataset
    write NNNNNN_stats.json), else by reading the tar headers (seeking over the data); 0 for a file that is no tar."""
    try:
        with open(url.removesuffix(".tar") + "_stats.json", encoding="utf-8") as f:
            stats = json.load(f)
        return next(int(stats[key]) for key in STATS_COUNTS if isinstance(stats.get(key), int))
    except (OSError, ValueError, StopIteration, AttributeError):
        pass
    keys = set()
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                key, ext = wds.tariterators.base_plus_ext(member.name)
                if member.isfile() and key is not None and ext.lower() in IMAGE_EXTENSIONS:
                    keys.add(key)
    except (tarfile.TarError, OSError):
        pass  # counted as far as it could be read
    return len(keys)


class _Tally(Counter):
    """SkipCounts without the log lines: samples left out, by reason."""

    def add(self, reason: str, what: str, detail: object = None) -> None:
        self[reason] += 1


class CaptionShards(torch.utils.data.IterableDataset):
    """Training samples streamed from shards: shard order shuffled, a sample shuffle buffer, split by rank and worker.

    Finite (default): each pass reads every shard once, the shards dealt out to ranks, then to loader workers.
    Resampled: every worker draws shards at random with replacement, an endless stream cut into epochs of
    `epoch_samples`. With `epoch_samples`, each reader (a rank's loader worker) yields exactly its share, rounded
    up to whole batches, so every rank runs the same number of steps: a finite reader whose own shards run out
    first (shards of different sizes, unreadable ones) goes on with the other readers' shards. `plan_epoch` sets
    the epoch size where several readers need one.
    """

    def __init__(self, spec: str, transform: Callable[[torch.Tensor], torch.Tensor] | None, shuffle: bool,
                 seed: int = 0, *, shuffle_buffer: int, resampled: bool = False, epoch_samples: int | None = None,
                 batch_size: int = 1, num_workers: int = 0):
        super().__init__()
        self.urls = resolve_shard_urls(spec)
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.epoch_samples = epoch_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.skipped = SkipCounts()
        self.unreadable_shards: set[str] = set()  # by this process
        self._raw_read = 0
        self._passes = 0

    def check_readers(self, world_size: int) -> None:
        """Finite streaming gives every (rank, worker) shards of its own: there must be enough of them."""
        readers = world_size * max(1, self.num_workers)
        if not self.resampled and len(self.urls) < readers:
            raise UsageError(f"{len(self.urls)} training shards for {readers} readers ({world_size} ranks x "
                             f"{max(1, self.num_workers)} workers): use --dataset-resampled with --train-num-samples, "
                             "fewer --num-workers, or more shards (smaller --shard-size)")

    def plan_epoch(self, world_size: int) -> None:
        """Give a finite stream read by several readers an epoch size, so that they all yield the same number of
        batches (a reader that ran out would leave its rank waiting for the others at every step, or finish the
        epoch alone): the samples the shards hold, unless --train-num-samples says."""
        self.check_readers(world_size)
        if self.resampled or self.epoch_samples is not None or world_size * max(1, self.num_workers) == 1:
            return
        if any(is_remote(url) for url in self.urls):
            raise UsageError("training on remote shards with several ranks or loader workers: give "
                             "--train-num-samples (the samples in one epoch), so that every reader yields as many")
        self.epoch_samples = sum(shard_sample_count(url) for url in self.urls)

    def _worker_samples(self, world_size: int) -> int:
        batches = math.ceil(self.epoch_samples / (world_size * max(1, self.num_workers) * self.batch_size))
        return batches * self.batch_size

    def __len__(self) -> int:
        """Samples per rank and epoch; only known with `epoch_samples`."""
        if self.epoch_samples is None:
            raise TypeError("streamed shards have no length without an epoch size")
        _, world_size, _, _ = wds.utils.pytorch_worker_info()
        return self._worker_samples(world_size) * max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict]:
        # A new order every pass; counted per process, which advances in step with epochs in the main
        # process and in persistent workers (non-persistent workers get a fresh copy and repeat pass 0).
        pass_seed = f"{self.seed}/{self._passes}"
        self._passes += 1
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        worker_seed = f"{pass_seed}/{rank}/{worker}"
        if self.resampled:
            shard_rng = random.Random(worker_seed)
            urls = (shard_rng.choice(self.urls) for _ in itertools.count())
        else:
            urls = list(self.urls)
            if self.shuffle:
                # the same shard order on every rank, so dealing it out below still partitions it
                random.Random(pass_seed).shuffle(urls)
            own = urls[rank::world_size][worker::num_workers]
            urls = own if self.epoch_samples is None else self._borrowing(own, urls, rank * num_workers + worker)
        samples = self._raw_samples(urls)
        if self.shuffle:
            samples = wds.shuffle(self.shuffle_buffer, seed=worker_seed)(samples)
        caption_rng = random.Random(f"{worker_seed}/captions")
        decoded = (self._sample(raw, caption_rng) for raw in samples)
        decoded = (sample for sample in decoded if sample is not None)
        if self.epoch_samples is not None:
            decoded = itertools.islice(decoded, self._worker_samples(world_size))
        yield from decoded

    def readable_samples(self, wanted: int) -> tuple[int, Counter, int]:
        """(readable samples of the shards in shard order, counted up to `wanted` (images decoded), the samples
        skipped by reason, the shards that could not be read); nothing is logged: a check before training, which
        reports the counts itself."""
        found, skipped, unreadable = 0, _Tally(), set()
        for raw in self._raw_samples(self.urls, lambda url, exn: unreadable.add(url) or True):
            found += read_sample(raw, skipped) is not None
            if found == wanted:
                break
        return found, skipped, len(unreadable)

    def _raw_samples(self, urls: Iterable[str], unreadable: Callable[[str, Exception], bool] | None = None,
                     select_files: Callable[[str], bool] | None = None) -> Iterator[dict]:
        """The samples of `urls` in order, as webdataset reads them (only the members `select_files` keeps); an
        unreadable shard is skipped, by default logged once."""
        unreadable = unreadable or self._unreadable
        for url in urls:
            for raw in wds.tarfile_samples([{"url": url}], handler=lambda exn, url=url: unreadable(url, exn),
                                           select_files=select_files):
                self._raw_read += 1
                yield raw

    def _unreadable(self, url: str, exn: Exception) -> bool:
        if url not in self.unreadable_shards:
            self.unreadable_shards.add(url)
            shard_error(exn)
        return True

    def _borrowing(self, own: list[str], everything: list[str], reader: int) -> Iterator[str]:
        """A finite reader's shards: its own, then, should its share need more, the others' over and over, starting
        at a place of its own among them (so that borrowers spread out), its own last."""
        yield from own
        others = [url for url in everything if url not in own]
        start = reader * len(others) // max(1, len(everything))
        cycle = others[start:] + others[:start] + own
        while True:
            read_before = self._raw_read
            yield from cycle
            if self._raw_read == read_before:  # the data went away under the run: stop, never spin
                raise UsageError(f"no sample could be read from any of the {len(everything)} training shards")

    def captions(self) -> Iterator[str]:
        """Every caption in shard order, streamed; only the .txt and .json members are read (so a sample without
        an image, or with one that cannot be decoded, still gives its captions)."""
        suffixes = tuple(f".{ext}" for ext in TEXT_EXTENSIONS)
        for raw in self._raw_samples(self.urls, select_files=lambda name: name.endswith(suffixes)):
            try:
                captions = sample_captions(raw)
            except SkippedSample:  # malformed KEY.json: the training stream skips this sample too
                continue
            yield from captions

    def tokenizer_cache_dir(self) -> str | None:
        """Where tokenizers trained on these shards' captions are kept: beside the shards, named by their contents."""
        if any(is_remote(url) for url in self.urls) or len({os.path.dirname(url) for url in self.urls}) != 1:
            return None
        fingerprint = hashlib.blake2b(digest_size=6)
        for url in self.urls:
            fingerprint.update(f"{os.path.basename(url)} {os.path.getsize(url)}\n".encode())
        return os.path.join(os.path.dirname(self.urls[0]), "tokenizers", fingerprint.hexdigest())

    def _sample(self, raw: dict, caption_rng: random.Random) -> dict | None:
        read = read_sample(raw, self.skipped)
        if read is None:
            return None
        sample, pixels = read
        return {"pixels": self.transform(pixels) if self.transform else pixels,
                "caption": caption_rng.choice(sample.captions), "image_id": _image_id(raw["__url__"], raw["__key__"])}
