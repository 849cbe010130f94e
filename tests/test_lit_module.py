"""The learning-rate schedule of the LightningModule, at the steps whose multiplier is known by hand."""
import math

import pytest

from clipfromscratch.lit_module import warmup_cosine


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
