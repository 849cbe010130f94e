"""Raw image-caption data -> webdataset shards: what every `data_prep/` script shares.

A split is a list of `Item`s in a fixed order, cut into shards of `shard_size` items, so shard N always
holds the same items. Worker processes each write a whole shard: every image is decoded once, converted
to RGB, capped at `max_size` and stored as JPEG (KEY.jpg), with KEY.json (captions, ids, original size,
labels) and KEY.txt (the first caption). A shard is written under a temporary name and renamed when
complete, so an existing `NNNNNN.tar` is always whole and a re-run skips it.

Output: OUTPUT/<split>/NNNNNN.tar, NNNNNN_stats.json (that shard's counts, as img2dataset writes them)
and stats.json (the split's totals). OUTPUT is checked, by writing to it, before the source is read.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from clipfromscratch.data.samples import UNREADABLE
from clipfromscratch.errors import CommandLineParser, UsageError, report
from clipfromscratch.outputs import check_output_dir

JPEG_QUALITY = 90
WHITE = (255, 255, 255)
MISSING, UNREADABLE_IMAGE, TOO_LARGE = "missing image", "unreadable image", "image too large"


@dataclass(frozen=True)
class Item:
    """One image to prepare: its key in the shard (unique, no dots), its file, its captions, extra KEY.json fields."""

    key: str
    image: str
    captions: tuple[str, ...]
    meta: dict = field(default_factory=dict)


def stable_order(keys: list[str]) -> list[str]:
    """`keys` in a pseudo-random order that depends on nothing but the keys: splits that never change between runs."""
    return sorted(keys, key=lambda key: hashlib.blake2b(key.encode(), digest_size=8).digest())


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # transparent pixels often hide black: put them on white, as product photos are shown
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def encode_image(path: str, max_size: int) -> tuple[bytes, int, int]:
    """The image at `path` as RGB JPEG bytes, longest side at most `max_size`, and its original width and height.

    Raises FileNotFoundError, Image.DecompressionBombError or another UNREADABLE error (a truncated file fails in load).
    """
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        small_rgb_jpeg = image.format == "JPEG" and image.mode == "RGB" and max(width, height) <= max_size
        image.draft(image.mode, (max_size, max_size))  # JPEG: decode huge images at a reduced scale, fast and small
        image.load()
        if small_rgb_jpeg:
            return data, width, height  # decoding proved it whole; re-encoding would only lose quality
        rgb = _rgb(image)
    rgb.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), width, height


@dataclass(frozen=True)
class ShardTask:
    path: str
    items: list[Item]
    max_size: int
    settings: dict


def _stats_path(shard: str) -> str:
    return shard.removesuffix(".tar") + "_stats.json"


def _write_json(path: str, value: dict) -> None:
    """Write then rename, so a reader never sees half a file; the same contents are not rewritten."""
    text = json.dumps(value, indent=1, sort_keys=True)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_shard(task: ShardTask) -> dict:
    """Write one shard to a temporary name and rename it when complete; returns its counts (also saved beside it)."""
    skipped: Counter = Counter()
    images = captions = 0
    partial = task.path + ".tmp"
    # a fixed mtime makes the same input give byte-identical shards
    with wds.TarWriter(partial, encoder=False, mtime=0) as sink:
        for item in task.items:
            try:
                jpg, width, height = encode_image(item.image, task.max_size)
            except FileNotFoundError:
                skipped[MISSING] += 1
                continue
            except Image.DecompressionBombError:
                skipped[TOO_LARGE] += 1
                continue
            except UNREADABLE:
                skipped[UNREADABLE_IMAGE] += 1
                continue
            meta = {**item.meta, "captions": list(item.captions), "width": width, "height": height}
            sink.write({"__key__": item.key, "jpg": jpg, "json": json.dumps(meta).encode(),
                        "txt": item.captions[0].encode()})
            images += 1
            captions += len(item.captions)
    stats = {"images": images, "captions": captions, "skipped": dict(skipped), "bytes": os.path.getsize(partial),
             "settings": task.settings}
    _write_json(_stats_path(task.path), stats)
    os.replace(partial, task.path)  # the shard exists only once it is whole
    return stats


@dataclass
class SplitReport:
    split: str
    stats: dict
    new_shards: int
    new_items: int


def prepare_split(split: str, items: list[Item], out_dir: str, *, shard_size: int, max_size: int, workers: int,
                  source: dict) -> SplitReport:
    """Write the shards of one split that are not there yet, then its stats.json."""
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp")):
        os.remove(stale)  # left by an interrupted run; its shard is redone below
    settings = {"max_size": max_size, "shard_size": shard_size, "items": len(items)}
    tasks = [ShardTask(os.path.join(out_dir, f"{n:06d}.tar"), items[start:start + shard_size], max_size, settings)
             for n, start in enumerate(range(0, len(items), shard_size))]
    done = {task.path: _read_stats(task.path, settings) for task in tasks
            if os.path.isfile(task.path) and os.path.isfile(_stats_path(task.path))}
    done = {path: stats for path, stats in done.items() if stats is not None}
    todo = [task for task in tasks if task.path not in done]
    pool = ProcessPoolExecutor(min(workers, max(1, len(todo))))
    try:
        with tqdm(total=sum(len(t.items) for t in todo), desc=split, unit="img", disable=None) as bar:
            for task, stats in zip(todo, pool.map(write_shard, todo)):
                done[task.path] = stats
                bar.update(len(task.items))
    except BrokenProcessPool:
        raise UsageError("a worker process died (killed, or out of memory?): run again to continue, "
                         "finished shards are kept") from None
    finally:
        pool.shutdown(cancel_futures=True)  # shards being written are finished, the rest wait for the next run
    shards = [done[task.path] for task in tasks]
    skipped = sum((Counter(s["skipped"]) for s in shards), Counter())
    stats = {"split": split, "shards": len(shards), "images": sum(s["images"] for s in shards),
             "captions": sum(s["captions"] for s in shards), "skipped": dict(sorted(skipped.items())),
             "bytes": sum(s["bytes"] for s in shards), "settings": settings, "source": source}
    _write_json(os.path.join(out_dir, "stats.json"), stats)
    return SplitReport(split, stats, len(todo), sum(len(t.items) for t in todo))


def _read_stats(shard: str, settings: dict) -> dict | None:
    """A finished shard's counts; None when they cannot be read, and the shard is written again."""
    try:
        with open(_stats_path(shard), encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, ValueError):  # JSONDecodeError, UnicodeDecodeError
        return None
    if not isinstance(stats, dict):
        return None
    if stats.get("settings") != settings:
        raise UsageError(f"{os.path.dirname(shard)} holds shards made with other settings ({stats.get('settings')}, "
                         f"now {settings}): write to another --output or delete it")
    return stats


def summary(output: str, reports: list[SplitReport], workers: int, seconds: float) -> str:
    """The one-page account printed at the end of a run."""
    lines = [f"{output}: {seconds:.1f} s with {workers} workers"]
    new = sum(r.new_items for r in reports)
    if new:
        lines[0] += f", {new / seconds:.0f} images/s ({new / seconds / workers:.0f} per worker)"
    lines.append(f"{'split':8s} {'shards':>7s} {'new':>5s} {'images':>10s} {'captions':>10s} {'MB':>9s}  skipped")
    for r in reports:
        s = r.stats
        skipped = ", ".join(f"{reason}: {n}" for reason, n in s["skipped"].items()) or "none"
        lines.append(f"{r.split:8s} {s['shards']:7d} {r.new_shards:5d} {s['images']:10,d} {s['captions']:10,d} "
                     f"{s['bytes'] / 1e6:9.1f}  {skipped}")
    if reports and reports[0].stats["source"]:
        lines.append("source: " + ", ".join(f"{k}: {v:,}" for k, v in reports[0].stats["source"].items()))
    return "\n".join(lines)


def argument_parser(description: str) -> argparse.ArgumentParser:
    """A data_prep command line with the options every script shares."""
    parser = CommandLineParser(description=description)
    parser.add_argument("--output", required=True, help="folder for <split>/NNNNNN.tar and <split>/stats.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: one per CPU)")
    parser.add_argument("--max-size", type=int, default=384, help="longest image side in pixels (default: 384)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default: 1000)")
    return parser


Splits = dict[str, list[Item]]


def run(parser: argparse.ArgumentParser, argv: list[str] | None,
        read: Callable[[argparse.Namespace], tuple[Splits, dict]]) -> int:
    """Parse the command line, check the output folder, read the source into splits, write their shards, print the
    summary; exit code."""
    try:
        args = parser.parse_args(argv)
        for name in ("workers", "max_size", "shard_size"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        check_output_dir(args.output, "--output")
        started = time.perf_counter()
        splits, source = read(args)
        reports = [prepare_split(split, items, os.path.join(args.output, split), shard_size=args.shard_size,
                                 max_size=args.max_size, workers=args.workers, source=source)
                   for split, items in splits.items()]
    except UsageError as err:
        return report(err)
    print(summary(args.output, reports, args.workers, time.perf_counter() - started))
    return 0


def read_json(path: str) -> dict:
    """A JSON file that must exist and parse, else a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON: {err}") from None
