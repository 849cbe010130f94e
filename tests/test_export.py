import json

import pytest
import torch
from PIL import Image

from clipfromscratch import load_model
from clipfromscratch.config import ModelConfig
from clipfromscratch.errors import UsageError
from clipfromscratch.export import export_model
from clipfromscratch.model import build_model
from clipfromscratch.text_tokenizers import make_tokenizer

CAPTIONS = ["a small red circle on the left", "a blue square above a green triangle", "one large yellow star"] * 10


@pytest.mark.parametrize("image_enc, text_enc, head", [("vit", "bert", "linear"), ("resnet", "gpt2", "mlp")])
def test_export_then_load_gives_identical_embeddings(tmp_path, image_enc, text_enc, head):
    torch.manual_seed(0)
    config = ModelConfig(image_encoder=image_enc, text_encoder=text_enc, head=head, image_size=32, embed_dim=32)
    model = build_model(config, make_tokenizer(text_enc, False, "tiny", CAPTIONS)).eval()
    export_model(model, str(tmp_path))
    assert {"model.safetensors", "config.json", "tokenizer"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "config.json").read_text())["model"]["image_encoder"] == image_enc

    loaded = load_model(str(tmp_path))
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    pixels = loaded.preprocess(image).unsqueeze(0)
    assert pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=0)
    texts = ["a red star", "one large yellow star on the left"]
    torch.testing.assert_close(loaded.encode_text(texts), model.encode_text(texts), rtol=0, atol=0)
    torch.testing.assert_close(loaded.logit_scale(), model.logit_scale())


def test_load_model_of_a_folder_that_is_no_export(tmp_path):
    with pytest.raises(UsageError, match="not an exported model"):
        load_model(str(tmp_path))
