"""Metric functions against hand-made inputs whose answers are worked out by hand."""
import math

import numpy as np
import pytest
import torch

from clipfromscratch.errors import UsageError
from clipfromscratch.eval import retrieval
from clipfromscratch.eval.class_agnostic import max_entropy, softmax_entropy, tempered_probabilities
from clipfromscratch.eval.cluster import cluster_scores, kmeans_scores, purity
from clipfromscratch.eval.probe import logistic_regression_probe, svm_probe
from clipfromscratch.eval.templates import CIFAR, GENERIC_PROMPTS, OPENAI_IMAGENET, load_prompts, load_templates
from clipfromscratch.eval.zeroshot import classification_metrics


def test_classification_metrics_by_hand():
    # 3 classes; predictions (argmax): 0, 1, 1, 2, 0 for labels 0, 0, 1, 2, 2
    scores = torch.tensor([[.9, .1, 0], [.2, .7, .1], [.1, .8, .1], [0, .3, .7], [.5, .2, .3]])
    metrics, confusion = classification_metrics(scores, torch.tensor([0, 0, 1, 2, 2]), ["a", "b", "c"])
    assert confusion.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert metrics["acc1"] == pytest.approx(3 / 5)
    assert "acc5" not in metrics  # with 3 classes every label is in the top 5
    # recalls 1/2, 1, 1/2; precisions 1/2, 1/2, 1
    assert metrics["mean_per_class_recall"] == pytest.approx(2 / 3)
    assert metrics["macro_recall"] == pytest.approx(2 / 3)
    assert metrics["macro_precision"] == pytest.approx(2 / 3)
    assert metrics["f1/a"] == pytest.approx(0.5)
    assert metrics["f1/b"] == pytest.approx(2 / 3)
    assert metrics["f1/c"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)


def test_top5_accuracy_counts_a_label_ranked_fifth_but_not_sixth():
    # 7 classes; sample 0's label ranks 5th, sample 1's 6th
    ranked = torch.tensor([7.0, 6, 5, 4, 3, 2, 1])
    scores = torch.stack([ranked, ranked])
    metrics, _ = classification_metrics(scores, torch.tensor([4, 5]), list("abcdefg"))
    assert metrics["acc1"] == 0.0
    assert metrics["acc5"] == pytest.approx(0.5)


def _full_matrix_recall(images, texts, text_to_image, k):
    """Brute force over the whole similarity matrix, as the definition reads."""
    sims = images @ texts.t()
    i2t = [(text_to_image[sims[i].topk(k).indices] == i).any().item() for i in range(len(images))]
    t2i = [(sims[:, j].topk(k).indices == text_to_image[j]).any().item() for j in range(len(texts))]
    return sum(t2i) / len(t2i), sum(i2t) / len(i2t)


def test_chunked_retrieval_equals_the_full_matrix(monkeypatch):
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    text_to_image = torch.randint(0, 40, (130,))
    text_to_image[:40] = torch.arange(40)  # every image has at least one caption, some several
    texts = torch.nn.functional.normalize(images[text_to_image] + 0.9 * torch.randn(130, 8), dim=-1)
    monkeypatch.setattr(retrieval, "CHUNK", 7)  # several blocks, the last one partial
    chunked = retrieval.retrieval_recall(images, texts, text_to_image, ks=(1, 5))
    for k in (1, 5):
        t2i, i2t = _full_matrix_recall(images, texts, text_to_image, k)
        assert chunked[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert chunked[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    assert 0 < chunked["image_retrieval_recall@1"] < chunked["image_retrieval_recall@5"] < 1


def test_retrieval_ties_decided_either_way_give_the_same_recall():
    # captions 0 and 1 of image 0 are identical: a tie between two right answers, a hit at k=1 either way;
    # caption 2 (image 2's) is as close to image 1 as to image 2: a hit at k=2, at k=1 only if the tie goes right
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0.6, 0.6], [0, 1.0, 0]])
    m = retrieval.retrieval_recall(images, texts, torch.tensor([0, 0, 2, 1]), ks=(1, 2))
    assert m["text_retrieval_recall@1"] == 1.0  # image 1 ranks caption 3 (1.0) over caption 2 (0.6)
    assert m["image_retrieval_recall@2"] == 1.0
    assert m["image_retrieval_recall@1"] in (pytest.approx(3 / 4), pytest.approx(1.0))


def _blobs(n_per_class: int, n_classes: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 10
    labels = np.repeat(np.arange(n_classes), n_per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_probes_separate_separable_features_and_not_noise():
    x, y = _blobs(30, 4, 16, 1.0, seed=0)
    test_x, test_y = _blobs(10, 4, 16, 1.0, seed=0)
    logistic = logistic_regression_probe(x, y, test_x, test_y)
    assert logistic["logreg_acc1"] == 1.0 and logistic["logreg_C"] in np.logspace(-3, 3, 7)
    assert svm_probe(x, y, test_x, test_y) == 1.0
    rng = np.random.default_rng(1)  # features that say nothing about the labels: near chance (0.25)
    noise_y = rng.integers(0, 4, 120)
    assert svm_probe(rng.normal(size=(120, 16)), noise_y, rng.normal(size=(80, 16)), rng.integers(0, 4, 80)) < 0.5


def test_purity_nmi_ari_by_hand_and_kmeans_on_blobs():
    # clusters {0,0,1} and {1,2,2}: majorities 2 and 2 of 6
    assert purity(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(4 / 6)
    relabelled = cluster_scores(np.array([0, 0, 1, 1]), np.array([5, 5, 3, 3]))  # same partition, other names
    assert relabelled == {"purity": 1.0, "nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}
    x, y = _blobs(20, 3, 8, 0.5, seed=2)
    assert kmeans_scores(x, y) == {"purity": 1.0, "nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}


def test_entropy_is_log_prompts_when_flat_and_falls_with_the_temperature():
    flat = torch.zeros(2, 32)
    assert softmax_entropy(flat).tolist() == pytest.approx([math.log(32)] * 2)
    assert max_entropy(32) == pytest.approx(3.4657, abs=1e-4)  # log(32), as the class-agnostic study reports
    cosines = torch.tensor([[0.30, 0.25, 0.20, 0.22]])
    entropies = [softmax_entropy(cosines, tau).item() for tau in (1.0, 0.07, 0.02)]
    assert entropies[0] > entropies[1] > entropies[2] > 0
    probabilities = tempered_probabilities(cosines, 0.07)
    assert probabilities.sum().item() == pytest.approx(1.0) and probabilities.argmax().item() == 0


def test_template_sets_and_files(tmp_path):
    assert len(OPENAI_IMAGENET) == len(set(OPENAI_IMAGENET)) == 80
    assert len(CIFAR) == len(set(CIFAR)) == 18 and len(GENERIC_PROMPTS) == 32
    assert [t("cat") for t in load_templates("simple")] == ["a photo of a cat."]
    assert load_templates("cifar")[-1]("cat") == "a photo of the big cat."
    good = tmp_path / "t.txt"
    good.write_text("a drawing of a {c}\n\nitap of my {c}\n")
    assert [t("dog") for t in load_templates(str(good))] == ["a drawing of a dog", "itap of my dog"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a drawing of a {c}\na photo\n")
    with pytest.raises(UsageError, match="every line needs"):
        load_templates(str(bad))
    with pytest.raises(UsageError, match="unknown templates 'imagenet'"):
        load_templates("imagenet")
    with pytest.raises(UsageError, match="not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    assert load_prompts(None) == list(GENERIC_PROMPTS)
