"""Figures of the evaluation, drawn off-screen: confusion matrices, metric bars, temperature curves (matplotlib),
and contact sheets of failed compositional items (PIL)."""
from __future__ import annotations

import csv
import math
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw


def write_confusion_csv(path: str, classnames: list[str], confusion: np.ndarray) -> None:
    """Rows are true classes, columns predicted ones, with the class names as header and first column."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classnames])
        writer.writerows([name, *map(int, row)] for name, row in zip(classnames, confusion))


def confusion_matrices(path: str, matrices: dict[str, tuple[list[str], np.ndarray]]) -> None:
    """{title: (class names, (C, C) counts)} side by side, each row normalised to the class's recall."""
    side = max(4.0, 0.35 * max(len(names) for names, _ in matrices.values()) + 2)
    fig, axes = plt.subplots(1, len(matrices), figsize=(side * len(matrices), side), squeeze=False)
    for ax, (title, (names, counts)) in zip(axes[0], matrices.items()):
        rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
        ticks = np.arange(len(names)) if len(names) <= 40 else []  # beyond that the labels only overlap
        ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=7)
        ax.set(title=title, xlabel="predicted", ylabel="true")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metric_bars(path: str, title: str, results: dict[str, dict[str, float]]) -> None:
    """{model: {metric: value}} as grouped bars, one group per metric that any model has (no bar where one lacks it)."""
    metrics = list(dict.fromkeys(metric for values in results.values() for metric in values))
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(metrics) * max(1, len(results) / 2)), 4))
    for i, (model, values) in enumerate(results.items()):
        ax.bar(np.arange(len(metrics)) + i * width, [values.get(m, np.nan) for m in metrics], width, label=model)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics, rotation=30, ha="right", fontsize=8)
    ax.set(title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def temperature_curves(path: str, curves: dict[str, list[dict[str, float]]]) -> None:
    """Probe accuracy and mean entropy against the temperature, one line per model (log-scaled tau)."""
    fig, (acc_ax, entropy_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for model, curve in curves.items():
        taus = [p["tau"] for p in curve]
        acc_ax.plot(taus, [p["svm_acc1"] for p in curve], marker="o", label=model)
        entropy_ax.plot(taus, [p["mean_entropy"] for p in curve], marker="o", label=model)
    for ax, label in ((acc_ax, "SVM accuracy on softmax(logits / tau)"), (entropy_ax, "mean entropy (nats)")):
        ax.set(xscale="log", xlabel="temperature tau", ylabel=label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def failure_sheet(path: str, failures: list, title: str, thumbnail: int = 112) -> None:
    """Items a scoring got wrong, as thumbnails, each with its true caption and the one chosen instead.

    `failures`: (ProbeItem, index of the chosen option) pairs; none: a sheet that says so.
    """
    columns = min(4, max(1, len(failures)))
    rows = math.ceil(len(failures) / columns)
    cell_w, cell_h, line = 3 * thumbnail, thumbnail + 8, 12
    sheet = Image.new("RGB", (columns * cell_w, 20 + max(1, rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title if failures else f"{title}: none", fill="black")
    for n, (item, chosen) in enumerate(failures):
        x, y = (n % columns) * cell_w, 20 + (n // columns) * cell_h
        image = item.load()
        if image is not None:
            image = image.copy()
            image.thumbnail((thumbnail, thumbnail))
            sheet.paste(image, (x + 2, y + 2))
        lines = [(f"[{item.category}] true:", "black"), *[(t, "darkgreen") for t in textwrap.wrap(item.options[0], 34)],
                 ("chosen:", "black"), *[(t, "darkred") for t in textwrap.wrap(item.options[chosen], 34)]]
        for k, (text, colour) in enumerate(lines[: cell_h // line]):
            draw.text((x + thumbnail + 8, y + 2 + k * line), text, fill=colour)
    sheet.save(path)
