"""`clipfromscratch train-dcsm --model M --output OUT`: a DCSM head over a model's frozen towers (see dcsm.py).

Each step scores a matrix of images and captions, every image against every caption, by the head reading
their dense similarity maps, and takes the cross-entropy of the true pairs both ways (Adam):
- `--data synthetic` (default): pairs of hard negatives drawn with the "train" vocabulary, an image and its
  caption against an opposite image and caption (colours swapped, objects swapped, the negated object present);
- `--data FILE` (a caption table or webdataset shards): images with their captions against hard negative
  captions made by swapping two of a caption's words.
The towers never change. The head is trained in a plain loop: one process, a few minutes, nothing to resume.
At the end the head is measured on the held-out "eval" vocabulary next to cosine scoring, and written:
- for our exports and checkpoints: a full export with the head (`load_model(OUT).score(...)` uses it);
- for `openai:` models: OUT/dcsm.json and dcsm.safetensors, and the model itself in OUT/base.
Both are models for `eval` and `compare`. OUT is written whole once the head is scored; it and every flag are
checked before the model is loaded.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, IterableDataset
from transformers.utils import logging as transformers_logging

from clipfromscratch.config import add_flags, opt, options_of, section_from
from clipfromscratch.data.compositional import training_pairs
from clipfromscratch.dcsm import TEXT_TOKENS, DenseScorer, encode_captions, similarity_maps
from clipfromscratch.errors import CommandLineParser, UsageError, report
from clipfromscratch.eval.compositional import SYNTHETIC_SIDE, open_probes, score_items
from clipfromscratch.eval.data import open_captioned
from clipfromscratch.eval.models import EvalModel, from_clip, load_clip, load_openai, parse_device
from clipfromscratch.export import CONFIG, HEAD_CONFIG, export_head_beside, write_export
from clipfromscratch.outputs import check_output_dir, write_dir_atomic

PAIRS_PER_STEP = 12  # a step's matrix is 24 x 24 on synthetic data (4 pairs of each category)
HELD_OUT = "dcsm_held_out.json"


@dataclass
class DcsmOptions:
    """What `train-dcsm` reads besides the model, the output and the device: flags made and checked by
    clipfromscratch.config."""

    data: str = opt("synthetic", "synthetic, a .tsv/.csv caption table, or webdataset shards")
    max_steps: int = opt(1500, "training steps", at_least=1)
    # a step scores each image against the others' captions: two at least
    batch_size: int = opt(PAIRS_PER_STEP, "pairs (synthetic) or images per step", at_least=2)
    lr: float = opt(1e-3, "Adam's learning rate", above=0)
    seed: int = opt(0, "seed of the head's weights, the pairs drawn and the held-out items", at_least=0,
                    at_most=2**32 - 1)
    eval_items: int = opt(300, "held-out 4-way items measured at the end", at_least=1)


def parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="clipfromscratch train-dcsm", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an export directory, a .ckpt, or openai:<hub name or dir>")
    p.add_argument("--output", required=True, help="where the model with its head is written")
    add_flags(p, options_of([DcsmOptions]))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (default: cuda when there is a GPU, else cpu)")
    return p


def _synthetic_batches(rng: random.Random, pairs: int) -> Iterator[tuple[list[Image.Image], list[str], int]]:
    """(images, captions, true pairs): image k true to caption k alone; the captions after the images' own are
    false of every image of their pair, as the other options of a 4-way item are."""
    while True:
        images, captions, false_of_both = training_pairs(rng, SYNTHETIC_SIDE, pairs)
        yield images, captions + false_of_both, len(images)


def swap_two_words(caption: str, rng: random.Random) -> str | None:
    """A hard negative of the same words: two different words swapped (None if the caption has no two)."""
    words = caption.split()
    positions = [(i, j) for i, j in itertools.combinations(range(len(words)), 2) if words[i] != words[j]]
    if not positions:
        return None
    i, j = rng.choice(positions)
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


def _caption_batches(spec: str, data: Dataset, rng: random.Random, size: int
                     ) -> Iterator[tuple[list[Image.Image], list[str], int]]:
    """(images, their captions then a negative for each, images) of the opened data SPEC names: captions that
    cannot be swapped are left out."""
    usable = []
    for sample in (data if isinstance(data, IterableDataset) else (data[i] for i in range(len(data)))):
        if sample is not None:
            image, captions = sample
            negative = swap_two_words(captions[0], rng)
            if negative is not None:
                usable.append((image, captions[0], negative))
    if len(usable) < 2:
        raise UsageError(f"{spec}: fewer than 2 readable images with a caption of two different words")
    while True:
        batch = rng.sample(usable, min(size, len(usable)))
        yield [b[0] for b in batch], [b[1] for b in batch] + [b[2] for b in batch], len(batch)


@torch.no_grad()
def _maps(model: EvalModel, images: list[Image.Image], captions: list[str], text_tokens: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.stack([model.preprocess(image) for image in images]).to(model.device)
    texts, mask, functional = encode_captions(model.encode_text_tokens, model.tokenizer, captions, model.device,
                                              text_tokens)
    return similarity_maps(model.encode_image_tokens(pixels).float(), texts.float(), mask), functional


def train_head(model: EvalModel, batches: Iterator, steps: int, lr: float, seed: int) -> DenseScorer:
    """A head for `model`'s maps, trained on `batches`; the towers are only read."""
    torch.manual_seed(seed)
    images, captions, true_pairs = next(batches)
    maps, functional = _maps(model, images, captions, TEXT_TOKENS)
    head = DenseScorer(image_tokens=maps.shape[2], text_tokens=maps.shape[3]).to(model.device)
    head.set_normalisation(maps, functional)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    started = time.perf_counter()
    for step in range(steps):
        if step:
            images, captions, true_pairs = next(batches)
            maps, functional = _maps(model, images, captions, head.text_tokens)
        logits = head(maps, functional)  # (images, captions)
        labels = torch.arange(true_pairs, device=model.device)
        # image -> its caption among all; caption -> its image, for the captions that have one
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :true_pairs].t(), labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f} s",
                  flush=True)
    return head.eval()


def main(argv: list[str]) -> int:
    transformers_logging.disable_progress_bar()  # its bars for reading and writing local files are noise in logs
    try:
        run(parser().parse_args(argv))
    except UsageError as err:
        return report(err)
    return 0


def check_args(args: argparse.Namespace) -> None:
    """The model and the output folder, before anything is loaded (the options are checked by `section_from`)."""
    if args.model.startswith("openclip:"):
        raise UsageError("train-dcsm takes our exports and checkpoints, and openai: models (open_clip models give "
                         "no token outputs here)")
    check_output_dir(args.output, "--output")
    # the output replaces the folder whole: an earlier model there, never a folder of other files
    if os.listdir(args.output) and not any(os.path.isfile(os.path.join(args.output, name))
                                           for name in (CONFIG, HEAD_CONFIG)):
        raise UsageError(f"--output {args.output} holds files that are not a model, and the output replaces the "
                         f"folder whole: give a new folder")


def run(args: argparse.Namespace) -> dict:
    options, device = section_from(DcsmOptions, vars(args)), parse_device(args.device)
    check_args(args)
    data = None if options.data == "synthetic" else open_captioned(options.data, None, 0)
    family, colon, source = args.model.partition(":")
    if colon and family == "openai":
        clip, model = None, load_openai(source, device)
    else:
        clip = load_clip(args.model, device)
        model = from_clip(clip, args.model)
    rng = random.Random(options.seed)
    batches = (_synthetic_batches(rng, options.batch_size) if data is None
               else _caption_batches(options.data, data, rng, options.batch_size))
    head = train_head(model, batches, options.max_steps, options.lr, options.seed)

    print(f"scoring the head on {options.eval_items} held-out items", flush=True)
    model.dense_scorer = head
    held_out = score_items(model, open_probes("synthetic", num_samples=options.eval_items, seed=options.seed))
    scores = {name: scored.metrics for name, scored in held_out.items()}
    summary = json.dumps({"model": args.model, "data": options.data, "steps": options.max_steps, **scores}, indent=2)

    def write(folder: str) -> None:
        if clip is not None:
            clip.dense_scorer = head
            write_export(clip, folder)
        else:
            from transformers import CLIPModel, CLIPProcessor  # the base model, saved as its library saves it

            base = export_head_beside(head, folder, family)
            CLIPModel.from_pretrained(source).save_pretrained(base)
            CLIPProcessor.from_pretrained(source).save_pretrained(base)
        with open(os.path.join(folder, HELD_OUT), "w", encoding="utf-8") as f:
            f.write(summary)

    write_dir_atomic(args.output, write)
    print(f"\nheld-out 4-way probes ({options.eval_items} items, colours, shapes and wordings unseen in training):")
    for name, metrics in scores.items():
        print(f"  {name:7s} " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("acc")))
    print(f"written: {args.output}", flush=True)
    return scores
