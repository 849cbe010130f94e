"""The evaluation tasks: each runs one model on one DATA and returns its metrics (and what plots need).

An Evaluation encodes each split once, so running several tasks on one model costs one pass over the images.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from clipfromscratch.config import opt
from clipfromscratch.errors import UsageError, first_line
from clipfromscratch.eval.class_agnostic import (
    TEMPERATURES,
    max_entropy,
    prompt_logits,
    softmax_entropy,
    tempered_probabilities,
)
from clipfromscratch.eval.cluster import kmeans_scores
from clipfromscratch.eval.compositional import open_probes, score_items
from clipfromscratch.eval.data import LabelledImages, open_captioned, open_labelled
from clipfromscratch.eval.embed import encode_images, encode_texts
from clipfromscratch.eval.models import EvalModel
from clipfromscratch.eval.probe import TEST_FRACTION, logistic_regression_probe, split, svm_probe
from clipfromscratch.eval.retrieval import retrieval_recall
from clipfromscratch.eval.templates import load_prompts, load_templates
from clipfromscratch.eval.zeroshot import Template, classification_metrics, zeroshot_classifier


@dataclass
class EvalOptions:
    """Everything a task reads besides the model: the options of `eval` and `compare`, flags and checks made by
    clipfromscratch.config as training's are."""

    data: str = opt("synthetic", "synthetic | imagefolder:DIR | cifar10:ROOT | cifar100:ROOT | a .tsv/.csv caption "
                                 "table | webdataset shards (a .tar, a directory, a brace pattern); compositional: "
                                 "synthetic | synthetic:2way | whatsup:FILE | sugarcrepe:FILE | negbench:FILE | "
                                 "aro:FILE")
    label: str | None = opt(None, "synthetic: colour or shape; shards: the KEY.json field holding the class")
    templates: str | None = opt(None, "zero-shot prompts: simple | openai_imagenet | cifar | a file with one template "
                                      "per line using {c} (none: the data's own, else simple)")
    classnames: str | None = opt(None, "imagefolder: file of class names, one per folder in sorted order")
    prompts: str | None = opt(None, "class-agnostic prompt file, one per line (none: 32 generic prompts)")
    num_samples: int | None = opt(None, "images per split (synthetic: 1000 when none; other data: a seeded random "
                                        "subset, all when none); compositional: items (synthetic: 300 when none)",
                                  at_least=1)
    batch_size: int = opt(64, "images per encoder call", at_least=1)
    num_workers: int = opt(0, "data loader worker processes", at_least=0)
    seed: int = opt(0, "seed for subsets, splits and k-means", at_least=0, at_most=2**32 - 1)
    download: bool = opt(False, "CIFAR: download into ROOT when missing (online)")
    image_root: str | None = opt(None, "compositional: the folder the annotation file's image paths are relative "
                                       "to (none: the file's folder)")


@dataclass
class TaskResult:
    metrics: dict[str, float]
    classnames: list[str] | None = None
    confusion: np.ndarray | None = None  # (C, C), rows true class, columns predicted
    temperature_curve: list[dict[str, float]] = field(default_factory=list)
    blocks: dict[str, dict[str, float]] = field(default_factory=dict)  # compositional: metrics per scoring
    failures: dict[str, list] = field(default_factory=dict)  # compositional: (item, chosen option) per scoring


class Evaluation:
    """One model on one DATA."""

    def __init__(self, model: EvalModel, options: EvalOptions):
        self.model = model
        self.options = options
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @cached_property
    def labelled(self) -> LabelledImages:
        o = self.options
        return open_labelled(o.data, o.label, o.classnames, o.num_samples, o.seed, o.download)

    def image_features(self, split_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) unit embeddings and (N,) labels of the `train` or `test` split."""
        if split_name not in self._features:
            dataset = getattr(self.labelled, split_name)
            features, labels = encode_images(self.model, dataset, self.options.batch_size, self.options.num_workers)
            self._features[split_name] = features, torch.tensor(labels, dtype=torch.long)
        return self._features[split_name]

    @cached_property
    def prompt_features(self) -> torch.Tensor:
        return encode_texts(self.model, load_prompts(self.options.prompts))

    def probe_splits(self, to_features: Callable[[torch.Tensor], torch.Tensor]):
        """(train x, test x, train y, test y) as arrays; data without a train split gives up part of its test."""
        test_x, test_y = self.image_features("test")
        if self.labelled.train is None:
            return split(to_features(test_x).numpy(), test_y.numpy(), TEST_FRACTION, self.options.seed)
        train_x, train_y = self.image_features("train")
        return to_features(train_x).numpy(), to_features(test_x).numpy(), train_y.numpy(), test_y.numpy()


def zeroshot_logits(model: EvalModel, image_features: torch.Tensor, classnames: Sequence[str],
                    templates: Sequence[Template]) -> torch.Tensor:
    """(N, D) images -> (N, C) logits, logit_scale * cosine to each class's prompt-ensemble embedding (plus the
    bias of a SigLIP model: `model.probabilities` turns them into probabilities)."""
    classifier = zeroshot_classifier(lambda texts: encode_texts(model, texts), classnames, templates)
    return model.logit_scale * image_features @ classifier.t() + (model.logit_bias or 0.0)


def retrieval(ev: Evaluation) -> TaskResult:
    o = ev.options
    images, captions = encode_images(ev.model, open_captioned(o.data, o.num_samples, o.seed), o.batch_size,
                                     o.num_workers)
    texts = [caption for image_captions in captions for caption in image_captions]
    text_to_image = torch.tensor([i for i, image_captions in enumerate(captions) for _ in image_captions])
    return TaskResult(retrieval_recall(images, encode_texts(ev.model, texts), text_to_image))


def zeroshot(ev: Evaluation) -> TaskResult:
    data, choice = ev.labelled, ev.options.templates
    templates = load_templates(choice) if choice else data.templates or load_templates("simple")
    features, labels = ev.image_features("test")
    metrics, confusion = classification_metrics(zeroshot_logits(ev.model, features, data.classnames, templates),
                                                labels, data.classnames)
    return TaskResult(metrics, data.classnames, confusion)


@contextmanager
def probe_data_check() -> Iterator[None]:
    """sklearn refuses to split or fit too few images, or a single class, with a ValueError: one line saying so."""
    try:
        yield
    except ValueError as err:
        raise UsageError(f"too few images or classes to fit a probe: {first_line(err)}") from None


@probe_data_check()
def linear_probe(ev: Evaluation) -> TaskResult:
    train_x, test_x, train_y, test_y = ev.probe_splits(lambda features: features)
    metrics = logistic_regression_probe(train_x, train_y, test_x, test_y, ev.options.seed)
    metrics["svm_acc1"] = svm_probe(train_x, train_y, test_x, test_y)
    return TaskResult(metrics)


@probe_data_check()
def class_agnostic(ev: Evaluation) -> TaskResult:
    prompts = ev.prompt_features
    train_x, test_x, train_y, test_y = ev.probe_splits(lambda features: prompt_logits(features, prompts))
    # the raw cosines as features (the class-agnostic study's baseline), then softmax(cosines / tau) for each tau
    metrics = {"num_prompts": float(len(prompts)), "max_entropy": max_entropy(len(prompts)),
               "svm_acc1": svm_probe(train_x, train_y, test_x, test_y)}
    curve = []
    for tau in TEMPERATURES:
        train_p, test_p = (tempered_probabilities(torch.from_numpy(x), tau).numpy() for x in (train_x, test_x))
        point = {"tau": tau, "mean_entropy": softmax_entropy(torch.from_numpy(test_x), tau).mean().item(),
                 "svm_acc1": svm_probe(train_p, train_y, test_p, test_y)}
        curve.append(point)
        metrics.update({f"tau={tau}/mean_entropy": point["mean_entropy"], f"tau={tau}/svm_acc1": point["svm_acc1"]})
    return TaskResult(metrics, temperature_curve=curve)


def cluster(ev: Evaluation) -> TaskResult:
    features, labels = ev.image_features("test")
    logits = prompt_logits(features, ev.prompt_features)
    metrics = {f"image/{k}": v for k, v in kmeans_scores(features.numpy(), labels.numpy(), ev.options.seed).items()}
    metrics.update({f"class_agnostic/{k}": v
                    for k, v in kmeans_scores(logits.numpy(), labels.numpy(), ev.options.seed).items()})
    return TaskResult(metrics)


def compositional(ev: Evaluation) -> TaskResult:
    o = ev.options
    scored = score_items(ev.model, open_probes(o.data, o.image_root, o.num_samples, o.seed), o.batch_size)
    return TaskResult({f"{name}/{k}": v for name, s in scored.items() for k, v in s.metrics.items()},
                      blocks={name: s.metrics for name, s in scored.items()},
                      failures={name: s.failures for name, s in scored.items()})


TASKS: dict[str, Callable[[Evaluation], TaskResult]] = {
    "retrieval": retrieval, "zeroshot": zeroshot, "linear_probe": linear_probe, "class_agnostic": class_agnostic,
    "cluster": cluster, "compositional": compositional,
}


def check_tasks(names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise UsageError(f"unknown task '{unknown[0]}': choose from {', '.join(TASKS)}")


def run_task(name: str, ev: Evaluation) -> TaskResult:
    check_tasks([name])
    return TASKS[name](ev)
