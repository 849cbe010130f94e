"""Zero-shot classification: class prompts become a linear head, averaged over a prompt ensemble."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

Template = Callable[[str], str]


@torch.no_grad()
def zeroshot_classifier(encode_text: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                        templates: Sequence[Template]) -> torch.Tensor:
    """(C, D): for each class the mean of its prompts' unit embeddings, re-normalised (CLIP's ensembling)."""
    weights = [F.normalize(encode_text([t(name) for t in templates]).mean(0), dim=-1) for name in classnames]
    return torch.stack(weights)


def zeroshot_accuracy(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> float:
    """Top-1 accuracy of (N, D) images against the (C, D) classifier; samples labelled -1 are left out."""
    keep = labels >= 0
    predictions = (image_features[keep] @ classifier.t()).argmax(1)
    return (predictions == labels[keep]).float().mean().item()


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]
                           ) -> tuple[dict[str, float], np.ndarray]:
    """(N, C) class scores and (N,) labels -> metrics (fractions in [0, 1]) and the (C, C) confusion matrix.

    `acc5` only where it means something (more than 5 classes); macro averages over the classes that occur in
    labels or predictions (sklearn's rule); per-class F1 (`f1/<class>`) for every class.
    """
    y_true, scores_np = labels.numpy(), scores.float().numpy()
    y_pred = scores_np.argmax(1)
    classes = list(range(len(classnames)))
    metrics = {"acc1": accuracy_score(y_true, y_pred)}
    if len(classnames) > 5:
        metrics["acc5"] = top_k_accuracy_score(y_true, scores_np, k=5, labels=classes)
    metrics["mean_per_class_recall"] = balanced_accuracy_score(y_true, y_pred)
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    metrics.update(macro_precision=precision, macro_recall=recall, macro_f1=f1)
    per_class = f1_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    metrics.update({f"f1/{name}": per_class[i] for i, name in enumerate(classnames)})
    return {k: float(v) for k, v in metrics.items()}, confusion_matrix(y_true, y_pred, labels=classes)
