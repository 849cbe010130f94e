"""Prompt sets: templates that turn a class name into captions, and class-agnostic prompts that name no class.

Templates are written with `{c}` where the class name goes. The OpenAI lists are the ones published with CLIP
(its ImageNet and CIFAR prompt-engineering notebooks). The 32 generic prompts are our own, written in the spirit of
the class-agnostic experiment of Benedetto's thesis "What Do Vision-Language Models Understand? Dissecting CLIP"
(which uses a set of its own: pass that list with `--prompts FILE` to reproduce its figures exactly).
"""
from __future__ import annotations

import os

from clipfromscratch.errors import UsageError, first_line
from clipfromscratch.eval.zeroshot import Template

SIMPLE = ("a photo of a {c}.",)

CIFAR = tuple(
    f"a {quality}photo of {article} {size}{{c}}."
    for article in ("a", "the")
    for quality, size in [("", ""), ("blurry ", ""), ("black and white ", ""), ("low contrast ", ""),
                          ("high contrast ", ""), ("bad ", ""), ("good ", ""), ("", "small "), ("", "big ")]
)

OPENAI_IMAGENET = (
    "a bad photo of a {c}.", "a photo of many {c}.", "a sculpture of a {c}.", "a photo of the hard to see {c}.",
    "a low resolution photo of the {c}.", "a rendering of a {c}.", "graffiti of a {c}.", "a bad photo of the {c}.",
    "a cropped photo of the {c}.", "a tattoo of a {c}.", "the embroidered {c}.", "a photo of a hard to see {c}.",
    "a bright photo of a {c}.", "a photo of a clean {c}.", "a photo of a dirty {c}.", "a dark photo of the {c}.",
    "a drawing of a {c}.", "a photo of my {c}.", "the plastic {c}.", "a photo of the cool {c}.",
    "a close-up photo of a {c}.", "a black and white photo of the {c}.", "a painting of the {c}.",
    "a painting of a {c}.", "a pixelated photo of the {c}.", "a sculpture of the {c}.", "a bright photo of the {c}.",
    "a cropped photo of a {c}.", "a plastic {c}.", "a photo of the dirty {c}.", "a jpeg corrupted photo of a {c}.",
    "a blurry photo of the {c}.", "a photo of the {c}.", "a good photo of the {c}.", "a rendering of the {c}.",
    "a {c} in a video game.", "a photo of one {c}.", "a doodle of a {c}.", "a close-up photo of the {c}.",
    "a photo of a {c}.", "the origami {c}.", "the {c} in a video game.", "a sketch of a {c}.", "a doodle of the {c}.",
    "a origami {c}.", "a low resolution photo of a {c}.", "the toy {c}.", "a rendition of the {c}.",
    "a photo of the clean {c}.", "a photo of a large {c}.", "a rendition of a {c}.", "a photo of a nice {c}.",
    "a photo of a weird {c}.", "a blurry photo of a {c}.", "a cartoon {c}.", "art of a {c}.", "a sketch of the {c}.",
    "a embroidered {c}.", "a pixelated photo of a {c}.", "itap of the {c}.", "a jpeg corrupted photo of the {c}.",
    "a good photo of a {c}.", "a plushie {c}.", "a photo of the nice {c}.", "a photo of the small {c}.",
    "a photo of the weird {c}.", "the cartoon {c}.", "art of the {c}.", "a drawing of the {c}.",
    "a photo of the large {c}.", "a black and white photo of a {c}.", "the plushie {c}.", "a dark photo of a {c}.",
    "itap of a {c}.", "graffiti of the {c}.", "a toy {c}.", "itap of my {c}.", "a photo of a cool {c}.",
    "a photo of a small {c}.", "a tattoo of the {c}.",
)

TEMPLATE_SETS = {"simple": SIMPLE, "openai_imagenet": OPENAI_IMAGENET, "cifar": CIFAR}

GENERIC_PROMPTS = (
    "a picture of a thing", "an image of an everyday item", "a snapshot of a natural scene",
    "a picture of something built by people", "an out-of-focus picture", "a macro shot",
    "a picture in bright daylight", "a picture taken at night", "a scene outside", "a scene inside a room",
    "something tiny", "something huge", "a creature", "a device", "something in motion", "something standing still",
    "a living being", "an artificial item", "a vivid, colourful picture", "a black and white picture",
    "a shiny surface", "a rough texture", "something made of wood", "something made of metal", "something in the air",
    "something in the water", "something with legs", "something with a round shape", "something with straight edges",
    "a cluttered picture", "a plain background", "a view from above",
)


def read_lines(path: str, what: str) -> list[str]:
    """The non-blank lines of a user's text file (templates, prompts, class names), stripped."""
    if not os.path.isfile(path):
        raise UsageError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {what} file {path}: {first_line(err)}") from None
    if not lines:
        raise UsageError(f"{what} file is empty: {path}")
    return lines


def as_template(text: str) -> Template:
    return lambda c: text.replace("{c}", c)


def load_templates(name: str) -> list[Template]:
    """`simple`, `openai_imagenet`, `cifar`, or a file with one template per line, each containing `{c}`."""
    if name in TEMPLATE_SETS:
        texts = list(TEMPLATE_SETS[name])
    elif os.path.splitext(name)[1] or os.sep in name:  # looks like a path, not a misspelt set name
        texts = read_lines(name, "template")
        bad = [t for t in texts if "{c}" not in t]
        if bad:
            raise UsageError(f"template file {name}: every line needs {{c}} where the class name goes, "
                             f"not in: {bad[0]!r}")
    else:
        raise UsageError(f"unknown templates '{name}': choose one of {', '.join(TEMPLATE_SETS)} or give a file")
    return [as_template(t) for t in texts]


def load_prompts(path: str | None) -> list[str]:
    """Class-agnostic prompts: the built-in 32 generic ones, or a file with one prompt per line."""
    return list(GENERIC_PROMPTS) if path is None else read_lines(path, "prompt")
