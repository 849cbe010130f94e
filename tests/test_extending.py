"""docs/extending.md, performed: an objective, an image tower, a text tower and an evaluation task, each added
from outside the package by one registry entry and its own code, then trained or evaluated as users run them."""
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipfromscratch import load_model
from clipfromscratch.cli import main as train
from clipfromscratch.encoders.image import IMAGE_ENCODERS
from clipfromscratch.encoders.text import TEXT_ENCODERS, TextFamily
from clipfromscratch.errors import UsageError
from clipfromscratch.eval.cli import main as command
from clipfromscratch.eval.tasks import TASKS, Evaluation, TaskResult
from clipfromscratch.formats.hf import check_hf
from clipfromscratch.objectives import OBJECTIVES, Objective, register_objective

TINY = ["--image-size", "32", "--batch-size", "16", "--embed-dim", "32", "--num-workers", "0", "--max-steps", "3",
        "--val-every-n-steps", "3", "--warmup-steps", "1", "--synthetic-val-samples", "32"]


# --- an objective: image-to-text InfoNCE alone (one process) ---

def image_to_text_loss(images, texts, scale, bias, rows):
    logits = scale * images @ texts.t()
    return F.cross_entropy(logits, torch.arange(len(images), device=logits.device))


@pytest.fixture
def one_way_objective():
    register_objective("image_to_text", Objective(init_log_logit_scale=float(np.log(1 / 0.07)), init_logit_bias=None,
                                                  loss=image_to_text_loss, probabilities=lambda x: x.softmax(-1)))
    yield
    del OBJECTIVES["image_to_text"]


@pytest.mark.slow
def test_a_new_objective_is_one_entry(tmp_path, one_way_objective):
    run = tmp_path / "run"
    assert train(["--loss", "image_to_text", *TINY, "--output-dir", str(run)]) == 0
    model = load_model(str(run / "final"))
    assert model.config.loss == "image_to_text" and model.logit_bias is None
    assert json.loads((run / "metrics.json").read_text())["step"] == 3


# --- an image tower that is neither timm nor transformers: the tower contract ---

class PatchMeanTower(nn.Module):
    """8 px patches embedded by one convolution and normalised; the pooled feature is their mean."""

    def __init__(self, image_size: int, width: int):
        super().__init__()
        self.patches = nn.Conv2d(3, width, kernel_size=8, stride=8)
        self.norm = nn.LayerNorm(width)
        self.num_features, self.image_size = width, image_size
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, num_features)
        return self.forward_tokens(pixels)[:, 0]

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:  # -> (B, 1 + P, num_features), pooled first
        tokens = self.norm(self.patches(pixels).flatten(2).transpose(1, 2))
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)

    def layer_groups(self) -> list[list[nn.Parameter]]:  # from the input up: for locking and layer decay
        return [list(self.patches.parameters()), list(self.norm.parameters())]

    def enable_grad_checkpointing(self) -> None:
        raise UsageError("patch_mean has nothing to checkpoint")


@dataclass(frozen=True)
class PatchMeanFamily:
    widths: dict

    def image_size(self, size: str) -> int:
        return 32

    def build(self, size: str, pretrained: bool, image_size: int, overrides: dict, patch_dropout: float):
        return PatchMeanTower(image_size, overrides.get("width", self.widths[size]))


@pytest.fixture
def patch_mean_family():
    IMAGE_ENCODERS.register("patch_mean", PatchMeanFamily({"tiny": 48, "base": 768}))
    yield
    IMAGE_ENCODERS.unregister("patch_mean")


@pytest.mark.slow
def test_a_new_image_tower_is_one_entry(tmp_path, patch_mean_family):
    run = tmp_path / "run"
    assert train(["--image-enc", "patch_mean", *TINY, "--lock-image", "--lock-image-unlocked-groups", "1",
                  "--output-dir", str(run)]) == 0
    model = load_model(str(run / "final"))
    assert model.image_tower.num_features == 48
    pixels = torch.randn(2, 3, 32, 32)
    assert model.encode_image_tokens(pixels).shape == (2, 1 + 16, 32)
    with pytest.raises(UsageError, match="neither a timm nor a transformers model"):
        check_hf(model)  # what the other formats cannot rebuild is refused in one line


# --- a text tower of another transformers family ---

@pytest.fixture
def roberta_family():
    TEXT_ENCODERS.register("roberta", TextFamily(
        hub_name="FacebookAI/roberta-base", model_type="roberta",
        presets={"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                              max_position_embeddings=130, vocab_size=4096),
                 "base": {}},
        pooling="cls", tokenizer_kind="bpe", attention="bidirectional", model_kwargs=dict(add_pooling_layer=False)))
    yield
    TEXT_ENCODERS.unregister("roberta")


@pytest.mark.slow
def test_a_new_text_tower_is_one_entry(tmp_path, roberta_family):
    run = tmp_path / "run"
    assert train(["--text-enc", "roberta", *TINY, "--output-dir", str(run)]) == 0
    model = load_model(str(run / "final"))
    assert model.text_tower.backbone.config.model_type == "roberta" and model.text_tower.pooling == "cls"
    alone = model.encode_text(["a red circle"])
    torch.testing.assert_close(model.encode_text(["a red circle", "a much longer caption about a blue star"])[:1],
                               alone, atol=1e-5, rtol=0)  # its padding is masked


# --- an evaluation task: classify by the nearest class mean of the training images ---

def nearest_class_mean(ev: Evaluation) -> TaskResult:
    train_x, test_x, train_y, test_y = ev.probe_splits(lambda features: features)
    classes = np.unique(train_y)
    means = np.stack([train_x[train_y == c].mean(0) for c in classes])
    predicted = classes[(test_x @ means.T).argmax(1)]
    return TaskResult({"nearest_mean_acc1": float((predicted == test_y).mean())})


@pytest.mark.slow
def test_a_new_evaluation_task_is_one_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(TASKS, "nearest_mean", nearest_class_mean)
    run = tmp_path / "run"
    assert train([*TINY, "--output-dir", str(run)]) == 0
    out = tmp_path / "nearest.json"
    assert command(["eval", "--model", str(run / "final"), "--task", "nearest_mean", "--data", "synthetic",
                    "--label", "colour", "--num-samples", "200", "--output", str(out)]) == 0
    accuracy = json.loads(out.read_text())["metrics"]["nearest_mean_acc1"]
    assert 1 / 8 < accuracy <= 1  # above chance among 8 colours, even after 3 steps
