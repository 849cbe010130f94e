"""The LightningModule: the learning-rate schedule at steps whose multiplier is known by hand, and training steps that
never wait for the device, a NaN step's update skipped there."""
import math
from dataclasses import replace

import pytest
import pytorch_lightning as pl
import torch

from clipfromscratch import trainer as trainer_module
from clipfromscratch.cli import main
from clipfromscratch.lit_module import warmup_cosine
from clipfromscratch.objectives import OBJECTIVES


@pytest.mark.parametrize("step, multiplier", [
    (0, 0.1),  # the first step already trains: 1 / warmup_steps, not 0
    (4, 0.5),
    (9, 1.0),  # the last warm-up step reaches the peak
    (10, 1.0),  # the cosine starts at the peak
    (35, 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter of the decay
    (60, 0.5),  # its midpoint
    (110, 0.0),  # the end
    (150, 0.0),  # past the end it stays at 0
])
def test_warmup_cosine_by_hand(step, multiplier):
    assert warmup_cosine(step, warmup_steps=10, total_steps=110) == pytest.approx(multiplier, abs=1e-12)


def test_without_warmup_the_cosine_starts_at_step_0():
    assert [warmup_cosine(step, 0, 4) for step in range(5)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])


# a step whose gradient is not finite, decided on the device


TINY = ["--image-size", "32", "--batch-size", "8", "--embed-dim", "32", "--num-workers", "0",
        "--synthetic-train-samples", "512", "--synthetic-val-samples", "16", "--warmup-steps", "2"]


@pytest.mark.slow
def test_the_update_of_a_nan_step_is_skipped_on_the_device(tmp_path, monkeypatch):
    """With --skip-nonfinite, the weights after a NaN step are those before it: the fused AdamW skipped the update
    (weights and moments), where a plain step with a NaN gradient would have made every weight NaN."""
    weights = {}

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            weights[batch_idx] = {k: v.clone() for k, v in module.model.state_dict().items()}

    real, calls = OBJECTIVES["clip"], []

    def nan_at_step_3(*args):
        calls.append(1)
        return real.loss(*args) * (float("nan") if len(calls) == 4 else 1.0)

    monkeypatch.setitem(OBJECTIVES, "clip", replace(real, loss=nan_at_step_3))
    callbacks = trainer_module.callbacks
    monkeypatch.setattr(trainer_module, "callbacks", lambda config, folder: [*callbacks(config, folder), Record()])
    assert main([*TINY, "--max-steps", "6", "--val-every-n-steps", "6", "--skip-nonfinite", "--output-dir",
                 str(tmp_path / "run")]) == 0
    for name, before in weights[3].items():  # the NaN step (batch 3) left every weight as it found it
        assert torch.equal(weights[4][name], before), name
    assert any(not torch.equal(weights[3][name], weights[2][name]) for name in weights[2])  # others did train


HOST_SYNCS = ("item", "__bool__", "cpu", "tolist", "numpy")


@pytest.mark.slow
def test_training_steps_wait_for_the_device_only_every_n_steps(tmp_path, monkeypatch):
    """A host sync (Tensor.item, bool, .cpu(), ...) in every step would stall a GPU step after step: between the
    steps that log (every --log-every-n-steps), a training step reads nothing back from the device."""
    synced_at: list[int] = []
    window = {"batch": None}

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if window["batch"] is not None:
                synced_at.append(window["batch"])
            return real(self, *args, **kwargs)
        return wrapper

    class Window(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            window["batch"] = batch_idx if 5 <= batch_idx < 35 else None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            window["batch"] = None  # what callbacks do after the step is theirs, not the step's

    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    callbacks = trainer_module.callbacks
    monkeypatch.setattr(trainer_module, "callbacks", lambda config, folder: [Window(), *callbacks(config, folder)])
    assert main([*TINY, "--max-steps", "40", "--val-every-n-steps", "40", "--log-every-n-steps", "10",
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert len(set(synced_at)) <= 3, sorted(set(synced_at))  # 30 steps, logged at most 3 times
