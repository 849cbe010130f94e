import pytest
import torch

from clipfromscratch.eval.retrieval import first_occurrences, retrieval_recall
from clipfromscratch.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier


def test_recall_with_several_captions_per_image():
    # 3 images on the axes; 4 captions: two of image 0, one each of images 1 and 2
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0, 0.9, 0.1], [0.1, 0.8, 0], [0, 0, 1.0]])
    text_to_image = torch.tensor([0, 0, 1, 2])
    m = retrieval_recall(images, texts, text_to_image, ks=(1, 2))
    # caption -> image: caption 1 finds image 1 first, image 0 never in its top 2 -> 3/4 at both k
    assert m["image_retrieval_recall@1"] == pytest.approx(0.75)
    assert m["image_retrieval_recall@2"] == pytest.approx(0.75)
    # image -> caption: image 1's best caption is caption 1, which is image 0's; its second is its own
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == 1.0


def test_recall_of_a_perfect_and_a_reversed_matching():
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(51, 16), dim=-1)
    perfect = retrieval_recall(feats, feats, torch.arange(51))
    assert all(v == 1.0 for v in perfect.values())
    # caption i belongs to image 50 - i but is closest to image i: only the middle one is right
    reversed_ = retrieval_recall(feats, feats, torch.arange(51).flip(0), ks=(1,))
    assert reversed_["image_retrieval_recall@1"] == reversed_["text_retrieval_recall@1"] == pytest.approx(1 / 51)


def test_zeroshot_ensemble_and_accuracy():
    table = {"a red": [1.0, 0.0], "a blue": [0.0, 1.0], "one red": [0.8, 0.6], "one blue": [0.6, 0.8]}
    encode = lambda texts: torch.tensor([table[t] for t in texts])
    classifier = zeroshot_classifier(encode, ["red", "blue"], [lambda c: f"a {c}", lambda c: f"one {c}"])
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(2))
    assert classifier[0, 0] > classifier[0, 1] and classifier[1, 1] > classifier[1, 0]
    images = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.9, 0.2], [0.0, 1.0]])
    assert zeroshot_accuracy(images, torch.tensor([0, 1, 1, -1]), classifier) == pytest.approx(2 / 3)


def test_first_occurrences_groups_rows_by_key():
    first, inverse = first_occurrences(torch.tensor([5, 3, 5, 7, 3]))
    assert first.tolist() == [1, 0, 3]  # keys 3, 5, 7
    assert inverse.tolist() == [1, 0, 1, 2, 0]
