"""The README's Python snippet, run as written: only the run folder and the image file are the test's own."""
import contextlib
import io
import os
import re

import torch
from PIL import Image
from test_eval_models import export_tiny_ours

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_the_readme_snippet_prints_the_models_probabilities(tmp_path, monkeypatch):
    text = open(README, encoding="utf-8").read()
    snippet = re.search(r"## Use a trained model.*?```python\n(.*?)```", text, re.DOTALL).group(1)
    export_tiny_ours(tmp_path / "checkpoints" / "<run>" / "final")
    Image.new("RGB", (64, 48), (200, 120, 40)).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    printed, scope = io.StringIO(), {}
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), scope)
    model, images, texts = scope["model"], scope["images"], scope["texts"]
    assert not images.requires_grad and not texts.requires_grad  # run without building a graph
    with torch.no_grad():
        expected = (model.logit_scale() * images @ texts.T).softmax(-1)
    assert printed.getvalue().strip() == str(expected)
    torch.testing.assert_close(expected.sum(-1), torch.ones(1))
    assert not torch.allclose(expected, (images @ texts.T).softmax(-1), atol=1e-3)  # without the scale: wrong
