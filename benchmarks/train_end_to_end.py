"""End-to-end training samples/s of ours against open_clip_train, side by side in one run: the same JPEG shards with
COCO-length captions, each framework's own loader, tokeniser and training step, loader workers on the same cores.

train_throughput.py compares the two steps at equal FLOPs, every caption filling the context, batches in memory.
A user's run differs: captions are short, images arrive as JPEGs in webdataset shards, and the loader workers
compete with the step for the cores. Our loader pads each batch to its longest caption (text_tokenizers.tokenize),
open_clip pads every caption to the full context; this measures what that, and everything else, is worth.

The data, written once into a temporary folder and read by both sides: KEY.jpg + KEY.txt per sample (the layout
of data_prep/ and img2dataset; both readers take the caption from KEY.txt), in as many shards as twice the
readers, enough samples for a round's steps.
- images: 224x224 JPEGs (quality 90) of random windows of scikit-learn's two sample photos, colour-scaled, so
  that decoding costs what a photo costs;
- captions: a word count drawn from CAPTION_WORDS, approximately COCO train2017 captions' word counts (an
  approximate histogram: 88% at 8-13 words, mean 10.5, a tail past 20; not measured here), words drawn uniformly
  from VOCABULARY (common caption words, about one token each for both tokenisers; the JSON line reports both
  sides' tokens per caption), seeded.

The towers: train_throughput.py's `small` pair (ViT width 192, 6 layers, 3 heads, patch 16 at 64 px; causal text
transformer width 192, 6 layers, 3 heads; embed 128; open_clip's vocabulary of 49408 on both sides), at
`--context-length` 77 by default: open_clip's CLIP configs' context, to which open_clip_train pads every caption
(COCO's fit it with room to spare). At full context both sides do the same FLOPs per sample.
- ours: `CaptionDataModule` over the shards in the CLI's order (`check_training_data`, a byte-level BPE trained on
  the shards' captions, `bind(model)`, its train_dataloader: torchvision JPEG decoding, a uint8 random resized
  crop, captions tokenised per batch and padded to the batch's longest), `CLIPModule` through `pl.Trainer.fit`
  (no logger, progress bar or checkpoints, as train_throughput.py steps ours);
- openclip: open_clip_train's own pieces, called: `create_model_and_transforms` (a local-dir config of the same
  pair; its 64 px training transform), `get_tokenizer` (CLIP's BPE, every caption padded to the context),
  `get_data` (its webdataset pipeline: PIL decoding, per-sample tokenising, `wds.batched`, a WebLoader),
  `create_loss` and `train_one_epoch`, with train_throughput.py's fused AdamW and cosine schedule; one fix to its
  loader for this project's webdataset (`fix_openclip_shard_ends`).
Both: fp32 on the CPU, no gradient clipping, the same batch size and `--workers` loader processes.

Each round trains each side afresh (a new Trainer or epoch, optimizer and loader, whose workers start in the
warm-up) for `--warmup` untimed then `--steps` timed steps. The timed window runs from the end of the last warm-up
step to the end of the last step, wall clock, loader stalls included: samples/s is steps x batch over it. The
loader's share is the time spent inside the loader's `next()` within the window over the window. Workers keep up
to 2 batches each ready (DataLoader's prefetch), filled during the warm-up on both sides alike: keep `--steps` well
above 2 x `--workers`. The sides alternate, the order flipping every round (noise from other processes hits both);
figures are medians over rounds, the ratio the median of the per-round ratios. Prints one JSON line.

    python benchmarks/train_end_to_end.py [--rounds 5] [--steps 24] [--warmup 3] [--batch-size 64] [--workers 2]
    python benchmarks/train_end_to_end.py --context-length 32   # open_clip at train_throughput.py's context
    python benchmarks/train_end_to_end.py --smoke   # 1 round of 2 steps at batch 8, no workers: seconds
"""
from __future__ import annotations

import argparse
import functools
import gc
import io
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import open_clip
import open_clip_train.data
import pytorch_lightning as pl
import torch
import webdataset as wds
from open_clip_train.data import DataInfo, get_data
from open_clip_train.train import train_one_epoch
from PIL import Image
from sklearn.datasets import load_sample_images
from train_throughput import (
    PAIR_VOCAB,
    PAIRS,
    Pair,
    StepClock,
    clip_module,
    millions,
    openclip_optimizer,
    quiet_lightning,
    stdout_to_stderr,
)

from clipfromscratch.config import DataConfig
from clipfromscratch.data.datamodule import CaptionDataModule
from clipfromscratch.encoders.text import text_config
from clipfromscratch.model import CLIP, build_model
from clipfromscratch.text_tokenizers import make_tokenizer

# words per caption: percent of captions, approximately COCO train2017 captions' word counts (approximate, not
# measured here; a few rare counts stand for their neighbours: 22 for 21-23, 25 for 24-27, 30 for longer ones)
CAPTION_WORDS = {7: 2.0, 8: 13.5, 9: 22.0, 10: 22.0, 11: 15.0, 12: 9.5, 13: 6.0, 14: 3.6, 15: 2.3, 16: 1.5, 17: 1.0,
                 18: 0.7, 19: 0.4, 20: 0.25, 22: 0.15, 25: 0.07, 30: 0.03}
VOCABULARY = tuple("""a an the of on in with and to at near next while two three is are sitting standing walking
riding holding eating looking playing lying parked flying man woman person people child boy girl player group dog
cat horse bird cow sheep elephant giraffe zebra bear car bus truck train plane boat bike motorcycle street road
table plate pizza sandwich cake food bowl cup kitchen room bed couch chair window door wall building city field
grass snow water beach ocean sky tree park clock sign light pole fence umbrella kite ball frisbee skateboard
surfboard wave bench laptop phone computer desk toilet sink mirror bathroom shirt hat large small white black red
blue green yellow brown old young some several tall front top side back down up over""".split())
JPEG_QUALITY = 90
SOURCE_SIZE = 224


def caption_word_mean() -> float:
    return sum(words * percent for words, percent in CAPTION_WORDS.items()) / sum(CAPTION_WORDS.values())


def captions(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 1])
    weights = np.array(list(CAPTION_WORDS.values()))
    lengths = rng.choice(list(CAPTION_WORDS), size=count, p=weights / weights.sum())
    return [" ".join(rng.choice(VOCABULARY, size=length)) for length in lengths]


def photos(count: int, seed: int) -> Iterator[bytes]:
    """`count` SOURCE_SIZE px square JPEGs: random windows (a third to all of the short side) of the two sample
    photos (427x640), each channel scaled by 0.8-1.2."""
    rng = np.random.default_rng([seed, 2])
    sources = load_sample_images().images
    for n in range(count):
        source = sources[n % len(sources)]
        h, w = source.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        window = source[y:y + side, x:x + side] * rng.uniform(0.8, 1.2, size=3)
        image = Image.fromarray(window.clip(0, 255).astype(np.uint8))
        jpeg = io.BytesIO()
        image.resize((SOURCE_SIZE, SOURCE_SIZE), Image.Resampling.BICUBIC).save(jpeg, "JPEG", quality=JPEG_QUALITY)
        yield jpeg.getvalue()


def write_shards(directory: str, texts: list[str], shard_count: int, seed: int) -> float:
    """One KEY.jpg + KEY.txt sample per caption in `shard_count` equal shards; returns the mean JPEG size in KB."""
    os.makedirs(directory, exist_ok=True)
    per_shard = math.ceil(len(texts) / shard_count)
    jpeg_bytes = 0
    samples = zip(texts, photos(len(texts), seed))
    for shard in range(shard_count):
        with wds.TarWriter(os.path.join(directory, f"{shard:06d}.tar"), encoder=False, mtime=0) as sink:
            for index, (text, jpeg) in enumerate(itertools.islice(samples, per_shard), shard * per_shard):
                sink.write({"__key__": f"{index:08d}", "jpg": jpeg, "txt": text.encode()})
                jpeg_bytes += len(jpeg)
    return jpeg_bytes / len(texts) / 1024


class TimedBatches:
    """`loader`'s batches (at most `limit`), recording when each `next()` was asked for and how long it took, and
    each batch's padded text length (`text_length` of the batch)."""

    def __init__(self, loader, text_length: Callable[[object], int], limit: int | None = None):
        self.loader = loader
        self.text_length = text_length
        self.limit = limit
        self.requests: list[float] = []
        self.fetches: list[tuple[float, float]] = []
        self.text_lengths: list[int] = []

    def __len__(self) -> int:
        # Lightning prefetches a batch ahead only from a loader without a length: keep the loader's behaviour
        return len(self.loader)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        for _ in range(self.limit) if self.limit is not None else itertools.count():
            start = time.perf_counter()
            self.requests.append(start)
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.fetches.append((start, time.perf_counter()))
            self.text_lengths.append(self.text_length(batch))
            yield batch
        self.requests.append(time.perf_counter())  # asked past the limit: the last step is over

    def waited(self, start: float, end: float) -> float:
        """Seconds spent inside `next()` between `start` and `end`."""
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.fetches)


@dataclass
class Window:
    """A round's timed steps: wall-clock seconds, seconds of them spent waiting for the loader."""

    seconds: float
    loader_seconds: float
    text_lengths: list[int] = field(repr=False)


def step_window(ends: list[float], batches: TimedBatches, steps: int, warmup: int, side: str) -> Window:
    """The window from the end of warm-up step `warmup` to the end of the last of `steps` timed steps."""
    if len(ends) != warmup + steps:
        raise RuntimeError(f"{side}: {len(ends)} steps ran, not {warmup + steps}: the loader ran short")
    start, end = ends[warmup - 1], ends[-1]
    return Window(end - start, batches.waited(start, end), batches.text_lengths)


def ours_model(pair: Pair, context_length: int, data: CaptionDataModule) -> CLIP:
    """Ours as the CLI builds it, a tokenizer trained on the training captions, with open_clip's vocabulary size
    (train_throughput.py's `pair_model`: the embedding and its AdamW state weigh the same on both sides)."""
    tokenizer = make_tokenizer("gpt2", False, "tiny", data.train_captions())
    special_ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    config = replace(pair.ours(), context_length=context_length)
    return build_model(config, tokenizer, text_config("gpt2", "tiny", config.text_overrides, PAIR_VOCAB, special_ids))


def ours_round(model: CLIP, data: CaptionDataModule, steps: int, warmup: int) -> Window:
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=warmup + steps, logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[clock], use_distributed_sampler=False)
    batches = TimedBatches(data.train_dataloader(), lambda batch: batch["input_ids"].shape[1])
    trainer.fit(clip_module(model), train_dataloaders=batches)
    return step_window(clock.ends, batches, steps, warmup, "ours")


def openclip_config(directory: str, pair: Pair, context_length: int) -> str:
    """The pair as an open_clip model config, in a folder that `local-dir:` names; returns that model name."""
    vision = {"image_size": pair.image_size, "layers": pair.vision_layers, "width": pair.vision_width,
              "head_width": pair.vision_width // pair.vision_heads, "patch_size": pair.patch_size}
    text = {"context_length": context_length, "vocab_size": PAIR_VOCAB, "width": pair.text_width,
            "heads": pair.text_heads, "layers": pair.text_layers}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "open_clip_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_cfg": {"embed_dim": pair.embed_dim, "vision_cfg": vision, "text_cfg": text}}, f)
    return f"local-dir:{directory}"


def openclip_args(model_name: str, shards: str, batch_size: int, workers: int, steps: int) -> argparse.Namespace:
    """What open_clip_train's get_data, create_loss and train_one_epoch read of its flags, at its defaults but for
    the data, the batch, the workers, the epoch (`steps` batches), the device and the precision (fp32, as ours)."""
    return argparse.Namespace(
        model=model_name, train_data=shards, val_data=None, dataset_type="webdataset", dataset_resampled=False,
        train_num_samples=steps * batch_size, train_data_upsampling_factors=None, imagenet_val=None,
        imagenet_v2=None, batch_size=batch_size, workers=workers, seed=0, device="cpu", precision="fp32",
        accum_freq=1, distill=False, siglip=False, local_loss=False, gather_with_grad=False, horovod=False,
        grad_clip_norm=None, skip_scheduler=False, log_every_n_steps=100, wandb=False, rank=0, local_rank=0,
        world_size=1, distributed=False)


def fix_openclip_shard_ends() -> None:
    """open_clip_train's own tar grouping reads every item of webdataset's tar expander as a file, and webdataset
    0.2.96 on (this project's) ends each shard with an empty marker item: a KeyError 'fname' at the end of the first
    shard (open_clip#935; open_clip_torch[training] pins webdataset<=0.2.86). Its maintainers' fix, without the
    marker, as 0.2.86 had it; the loader workers, forked, inherit it."""
    open_clip_train.data.tar_file_expander = functools.partial(wds.tariterators.tar_file_expander, eof_value=None)


def openclip_round(model: open_clip.CLIP, transforms: tuple, tokenizer, loss: torch.nn.Module,
                   args: argparse.Namespace, steps: int, warmup: int) -> Window:
    info = get_data(args, transforms, tokenizer=tokenizer)["train"]
    batches = TimedBatches(info.dataloader, lambda batch: batch[1].shape[1], limit=warmup + steps)
    # train_one_epoch reads the epoch's size from its loader
    batches.num_batches, batches.num_samples = warmup + steps, (warmup + steps) * args.batch_size
    optimizer, scheduler = openclip_optimizer(model, warmup + steps)
    train_one_epoch(model, {"train": DataInfo(batches, shared_epoch=info.shared_epoch)}, loss, 0, optimizer, None,
                    scheduler, None, args)
    # a step ends when the loop asks for the next batch
    return step_window(batches.requests[1:], batches, steps, warmup, "openclip")


def reader_batches(steps: int, readers: int) -> int:
    """Batches each loader reader (a worker, or the main process) must be able to make in a round: its share of the
    steps, and one more, which a reader's last partial batch may fall short of."""
    return math.ceil(steps / readers) + 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=24, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them (at least 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes, on both sides")
    parser.add_argument("--context-length", type=int, default=77,
                        help="text context: open_clip pads every caption to it, ours each batch to its longest")
    parser.add_argument("--seed", type=int, default=0, help="of the captions and the photos' windows")
    parser.add_argument("--smoke", action="store_true", help="1 round of 2 steps after 1, batch 8, no workers")
    args = parser.parse_args(argv)
    if args.smoke:
        args = argparse.Namespace(**{**vars(args), "rounds": 1, "steps": 2, "warmup": 1, "batch_size": 8,
                                     "workers": 0})
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the timed window starts at the end of a warm-up step")
    return args


def run(args: argparse.Namespace, root: str) -> dict:
    """The measurements, as the JSON line prints them; shards and the open_clip config go under `root`."""
    quiet_lightning()
    load_start = os.getloadavg()[0]
    pair, batch_size, workers = PAIRS["small"], args.batch_size, args.workers
    readers = max(1, workers)
    steps_per_round = args.warmup + args.steps
    texts = captions(readers * reader_batches(steps_per_round, readers) * batch_size, args.seed)
    shards = os.path.join(root, "shards")
    jpeg_kb = write_shards(shards, texts, 2 * readers, args.seed)

    torch.manual_seed(0)
    data = CaptionDataModule(DataConfig(train_data=shards, batch_size=batch_size, num_workers=workers),
                             pair.image_size, seed=0)
    data.check_training_data(world_size=1)
    ours = ours_model(pair, args.context_length, data)
    data.bind(ours)

    fix_openclip_shard_ends()
    model_name = openclip_config(os.path.join(root, "openclip"), pair, args.context_length)
    openclip, *transforms = open_clip.create_model_and_transforms(model_name, output_dict=True)
    tokenizer = open_clip.get_tokenizer(model_name)
    # open_clip_train names its shards by a brace pattern or a `::` list; a folder is ours' way
    shard_list = "::".join(sorted(os.path.join(shards, name) for name in os.listdir(shards)))
    openclip_train_args = openclip_args(model_name, shard_list, batch_size, workers, steps_per_round)
    loss = open_clip.create_loss(openclip_train_args)

    sides = {
        "ours": lambda: ours_round(ours, data, args.steps, args.warmup),
        "openclip": lambda: openclip_round(openclip, tuple(transforms), tokenizer, loss, openclip_train_args,
                                           args.steps, args.warmup),
    }
    windows: dict[str, list[Window]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name in list(sides)[::1 if round_ % 2 == 0 else -1]:
            windows[name].append(sides[name]())
            gc.collect()  # the round's loader, and with it its worker processes, go before the next side starts
    median = statistics.median
    rates = {name: [args.steps * batch_size / w.seconds for w in ws] for name, ws in windows.items()}
    shares = {name: median(w.loader_seconds / w.seconds for w in ws) for name, ws in windows.items()}
    padded = {name: statistics.mean(n for w in ws for n in w.text_lengths) for name, ws in windows.items()}
    sample = texts[:1000]
    tokens = {"ours": statistics.mean(len(ids) for ids in ours.tokenizer(sample)["input_ids"]),
              "openclip": (tokenizer(sample) != 0).sum(1).float().mean().item()}
    return {
        "end_to_end_ratio": round(median(a / b for a, b in zip(rates["ours"], rates["openclip"])), 3),
        "samples_per_s": round(median(rates["ours"]), 1), "openclip_samples_per_s": round(median(rates["openclip"]), 1),
        "padded_text_length": round(padded["ours"], 2), "openclip_padded_text_length": round(padded["openclip"], 2),
        "loader_wait_share": round(shares["ours"], 3), "openclip_loader_wait_share": round(shares["openclip"], 3),
        "tokens_per_caption": {name: round(n, 2) for name, n in tokens.items()},
        "caption_words_mean": round(caption_word_mean(), 2),
        "samples_per_s_per_round": {name: [round(r, 1) for r in values] for name, values in rates.items()},
        "params_m": millions(ours), "openclip_params_m": millions(openclip),
        "batch_size": batch_size, "workers": workers, "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "context_length": args.context_length, "pair": "small", "device": "cpu",
        "precision": "32-true", "threads": torch.get_num_threads(), "samples_written": len(texts),
        "shards": 2 * readers, "jpeg_kb": round(jpeg_kb, 1), "image_size": pair.image_size,
        "source_image_size": SOURCE_SIZE, "smoke": args.smoke,
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as root, stdout_to_stderr():
        result = run(args, root)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
