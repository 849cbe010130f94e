"""Compositional probes drawn with the embedded renderer: attribute binding, spatial relations and negation.

A probe item is an image and caption options made of the same words, the true one first. As 4-way items they
have the format of CLEVR-bind and WhatsUp (chance 25%); as 2-way items, of SugarCrepe and ARO (chance 50%):
- binding: two objects; "a red circle and a blue square" against the colours swapped (4-way: and both objects
  in either colour);
- spatial: two objects; the relation (4-way: left, right, above, below) or, 2-way, the order of the objects;
- negation: one object; "a red circle and no blue square" against "... and a blue square" (4-way: also the
  objects the other way round, and "no red circle"), or, 2-way, "no blue square" against "a blue square"; half
  the 2-way items show what the caption without "no" says, so a scorer that prefers negated captions scores 50%.
Two vocabularies split colours, shapes and wordings: a head trained on "train" pairs is measured on "eval"
items whose words it never saw. Everything is deterministic by seed.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from clipfromscratch.data.synthetic import COLOURS, RELATIONS, SIZES, Thing, _a, render

CATEGORIES = ("binding", "spatial", "negation")
Phrase = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class Vocabulary:
    """Words and wordings of one side of the split. A caption is a prefix and a template; templates take noun
    phrases {a} and {b} ("a red circle"), or {an} and {bn} without the article ("red circle"). The options of
    one item share its prefix. Relation and negation words are the same on both sides: they are what DCSM's
    functional rows stand for; the words around them differ."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    prefixes: tuple[str, ...]
    binding: tuple[str, ...]
    spatial: dict[str, tuple[str, ...]]  # relation -> templates stating "{a} <relation> {b}"
    negation: tuple[str, ...]  # {a} is there, {b} is not; negation[k] and both[k] are worded alike
    both: tuple[str, ...]  # {a} and {b} are there
    absent: tuple[str, ...]  # {a} is not there
    present: tuple[str, ...]  # {a} is there


VOCABULARIES = {
    "train": Vocabulary(
        colours=("red", "green", "blue", "yellow"), shapes=("circle", "square", "triangle"),
        prefixes=("", "a picture of ", "we can see ", "this is ", "a drawing with "),
        binding=("{a} and {b}", "{a} next to {b}", "{a} beside {b}"),
        spatial={"left": ("{a} to the left of {b}", "{a} left of {b}"),
                 "right": ("{a} to the right of {b}", "{a} right of {b}"),
                 "above": ("{a} above {b}", "{a} just above {b}"), "below": ("{a} below {b}", "{a} just below {b}")},
        negation=("{a} and no {bn}", "{a} without {b}", "{a} but no {bn}"),
        both=("{a} and {b}", "{a} with {b}", "{a} and also {b}"),
        absent=("no {an}", "no {an} here"), present=("{a}", "{a} here")),
    "eval": Vocabulary(
        colours=("purple", "orange", "pink", "brown"), shapes=("diamond", "cross", "star"),
        prefixes=("there is ", "an image showing ", "look at "),
        binding=("{a} together with {b}", "{a} as well as {b}"),
        spatial={"left": ("{a} on the left of {b}", "{a} placed left of {b}"),
                 "right": ("{a} on the right of {b}", "{a} placed right of {b}"),
                 "above": ("{a} placed above {b}", "{a} somewhere above {b}"),
                 "below": ("{a} placed below {b}", "{a} somewhere below {b}")},
        negation=("{a} without any {bn}", "{a}, but no {bn} at all"),
        both=("{a} together with {b}", "{a}, and {b} too"),
        absent=("no {an} at all", "no {an} anywhere"), present=("{a} somewhere", "{a} in view")),
}
OTHER_RELATIONS = {rel: [r for r in RELATIONS if r != rel] for rel in RELATIONS}
# the relations false of a scene and of its mirror image
PERPENDICULAR = {"left": ["above", "below"], "right": ["above", "below"], "above": ["left", "right"],
                 "below": ["left", "right"]}


@dataclass(frozen=True)
class ProbeItem:
    """An image (loaded on demand; None if it cannot be read), caption options with the true one first."""

    load: Callable[[], Image.Image | None]
    options: tuple[str, ...]
    category: str


def _np(colour: str, shape: str) -> str:
    return _a(f"{colour} {shape}")


class _Scenes:
    """Random objects and layouts of one vocabulary, from one seeded generator."""

    def __init__(self, vocabulary: Vocabulary, rng: random.Random):
        self.v, self.rng = vocabulary, rng

    def two_objects(self) -> tuple[Phrase, Phrase]:
        """Two objects that differ in colour and in shape, so swapping either changes the scene."""
        c1, c2 = self.rng.sample(self.v.colours, 2)
        s1, s2 = self.rng.sample(self.v.shapes, 2)
        return (c1, s1), (c2, s2)

    def template(self, templates: tuple[str, ...]) -> str:
        return self.rng.choice(templates)

    def worded(self, templates: tuple[str, ...]) -> tuple[str, ...]:
        """`templates` behind one prefix, drawn for the item they word."""
        prefix = self.rng.choice(self.v.prefixes)
        return tuple(prefix + t for t in templates)

    def things(self, placed: list[tuple[Phrase, float, float]], size: str = "medium") -> list[Thing]:
        jitter = [self.rng.uniform(-0.04, 0.04) for _ in range(2 * len(placed))]
        return [Thing(colour, shape, size, x + jitter[2 * k], y + jitter[2 * k + 1],
                      tuple(int(np.clip(v + self.rng.randint(-20, 20), 0, 255)) for v in COLOURS[colour]))
                for k, ((colour, shape), x, y) in enumerate(placed)]

    def side_by_side(self, first: Phrase, second: Phrase) -> list[Thing]:
        """Two objects apart, in a random order."""
        left, right = (first, second) if self.rng.random() < 0.5 else (second, first)
        y = 0.5 + self.rng.uniform(-0.15, 0.15)
        return self.things([(left, 0.27, y), (right, 0.73, y)])

    def related(self, first: Phrase, relation: str, second: Phrase) -> list[Thing]:
        """`first` left of / right of / above / below `second`."""
        (dx, dy), _, _ = RELATIONS[relation]
        cx, cy = 0.5 + self.rng.uniform(-0.05, 0.05), 0.5 + self.rng.uniform(-0.05, 0.05)
        return self.things([(first, cx + 0.23 * dx, cy + 0.23 * dy), (second, cx - 0.23 * dx, cy - 0.23 * dy)])

    def alone(self, thing: Phrase) -> list[Thing]:
        x, y = self.rng.uniform(0.3, 0.7), self.rng.uniform(0.3, 0.7)
        return self.things([(thing, x, y)], size=self.rng.choice(list(SIZES)[1:]))


def _fill(template: str, a: Phrase, b: Phrase = ("", "")) -> str:
    return template.format(a=_np(*a), b=_np(*b), an=" ".join(a), bn=" ".join(b))


def _say(scenes: _Scenes, relation: str, k: int) -> str:
    return scenes.v.spatial[relation][k % len(scenes.v.spatial[relation])]


def _probe(scenes: _Scenes, category: str, ways: int) -> tuple[list[Thing], list[str]]:
    """One item's objects and caption options, the true caption first."""
    v, rng = scenes.v, scenes.rng
    a, b = scenes.two_objects()
    if category == "binding":
        [t] = scenes.worded((scenes.template(v.binding),))
        swapped = ((b[0], a[1]), (a[0], b[1]))
        options = [_fill(t, a, b), _fill(t, *swapped)]
        if ways == 4:
            options += [_fill(t, a, (a[0], b[1])), _fill(t, (b[0], a[1]), b)]  # both in one colour
        return scenes.side_by_side(a, b), options
    if category == "spatial":
        relation, k = rng.choice(list(RELATIONS)), rng.randrange(2)
        if ways == 4:
            relations = [relation, *OTHER_RELATIONS[relation]]
            options = [_fill(t, a, b) for t in scenes.worded(tuple(_say(scenes, r, k) for r in relations))]
        else:
            [t] = scenes.worded((_say(scenes, relation, k),))
            options = [_fill(t, a, b), _fill(t, b, a)]
        return scenes.related(a, relation, b), options
    # negation: only `a` is in the image (2-way: in half the items `b` is there too, or `b` alone, and the caption
    # without the negation is the true one, so that preferring negated captions scores chance)
    k = rng.randrange(len(v.negation))
    if ways == 4:
        negated, both, absent = scenes.worded((v.negation[k], v.both[k], scenes.template(v.absent)))
        options = [_fill(negated, a, b), _fill(both, a, b), _fill(negated, b, a), _fill(absent, a)]
        return scenes.alone(a), options
    negation_true = rng.random() < 0.5
    if rng.random() < 0.5:
        negated, both = scenes.worded((v.negation[k], v.both[k]))
        options = [_fill(negated, a, b), _fill(both, a, b)]
        things = scenes.alone(a) if negation_true else scenes.side_by_side(a, b)
    else:
        absent, present = scenes.worded((v.absent[k % len(v.absent)], v.present[k % len(v.present)]))
        options = [_fill(absent, b), _fill(present, b)]
        things = scenes.alone(a) if negation_true else scenes.alone(b)
    return things, options if negation_true else options[::-1]


def probe_items(vocabulary: str = "eval", ways: int = 4, count: int = 300, seed: int = 0,
                image_size: int = 64) -> list[ProbeItem]:
    """`count` items, the categories in turn, rendered at `image_size` when loaded."""
    scenes = _Scenes(VOCABULARIES[vocabulary], random.Random(f"probes/{vocabulary}/{ways}/{seed}"))
    items = []
    for n in range(count):
        category = CATEGORIES[n % len(CATEGORIES)]
        things, options = _probe(scenes, category, ways)
        items.append(ProbeItem(functools.partial(_draw, things, image_size, (seed, n)), tuple(options), category))
    return items


def _draw(things: list[Thing], side: int, seed: tuple[int, ...]) -> Image.Image:
    return render(things, side, np.random.default_rng(seed))


def training_pairs(rng: random.Random, image_size: int, count: int, vocabulary: str = "train"
                   ) -> tuple[list[Image.Image], list[str], list[str]]:
    """`count` pairs of hard negatives: 2 x count images and their captions (pair k at k and count + k), and
    captions false of both images of their pair, as the other options of a 4-way item are.

    Each pair is a scene with its caption and an opposite scene with the opposite caption: colours swapped,
    objects swapped in place, or the negated object present; caption k is true of image k alone.
    """
    scenes = _Scenes(VOCABULARIES[vocabulary], rng)
    v = scenes.v
    first, second, false_of_both = [], [], []
    for n in range(count):
        category = CATEGORIES[n % len(CATEGORIES)]
        a, b = scenes.two_objects()
        if category == "binding":
            [t] = scenes.worded((scenes.template(v.binding),))
            swapped = ((b[0], a[1]), (a[0], b[1]))
            one = scenes.side_by_side(a, b)
            # the same shapes in the same places, their colours swapped
            two = scenes.things([((b[0] if (s.colour, s.shape) == a else a[0], s.shape), s.x, s.y) for s in one])
            pairs = ((one, _fill(t, a, b)), (two, _fill(t, *swapped)))
            false_of_both += [_fill(t, a, (a[0], b[1])), _fill(t, (b[0], a[1]), b)]  # both in one colour
        elif category == "spatial":
            relation, k = rng.choice(list(RELATIONS)), rng.randrange(2)
            relations = [relation, *PERPENDICULAR[relation]]
            t, *across = scenes.worded(tuple(_say(scenes, r, k) for r in relations))
            pairs = ((scenes.related(a, relation, b), _fill(t, a, b)),
                     (scenes.related(b, relation, a), _fill(t, b, a)))
            false_of_both += [_fill(other, a, b) for other in across]
        elif rng.random() < 0.5:
            k = rng.randrange(len(v.negation))
            negated, both, absent = scenes.worded((v.negation[k], v.both[k], v.absent[k % len(v.absent)]))
            pairs = ((scenes.alone(a), _fill(negated, a, b)), (scenes.side_by_side(a, b), _fill(both, a, b)))
            false_of_both += [_fill(negated, b, a), _fill(absent, a)]
        else:
            k = rng.randrange(len(v.absent))
            absent, present = scenes.worded((v.absent[k], v.present[k % len(v.present)]))
            pairs = ((scenes.alone(a), _fill(absent, b)), (scenes.alone(b), _fill(present, b)))
        first.append(pairs[0])
        second.append(pairs[1])
    background = np.random.default_rng(rng.getrandbits(32))
    images = [render(things, image_size, background) for things, _ in first + second]
    return images, [caption for _, caption in first + second], false_of_both
