import json
import os
import shutil

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


def _damage_json(path, change):
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize("damage, file, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     "model.safetensors", "is damaged or incomplete"),
    (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors", "is damaged or incomplete"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json", "is not valid JSON"),
    (lambda d: _damage_json(d / "config.json", lambda c: c["model"].update(embed_dim="wide")), "config.json",
     "option embed_dim expects int"),
    (lambda d: _damage_json(d / "config.json", lambda c: c.pop("model")), "config.json", "has no 'model'"),
    (lambda d: _damage_json(d / "config.json", lambda c: c["text_config"].update(hidden_size="big")),
     "config.json", "cannot build the model it describes"),
    (lambda d: _damage_json(d / "config.json", lambda c: c.update(dcsm={"image_tokens": 0})), "config.json",
     "a DCSM head needs image_tokens and text_tokens"),
    (lambda d: _damage_json(d / "config.json", lambda c: c["model"].update(embed_dim=16)), "model.safetensors",
     "does not fit its config: RuntimeError: Error(s) in loading state_dict for CLIP: size mismatch"),
    (lambda d: shutil.rmtree(d / "tokenizer"), "tokenizer", "not found: the export has no tokenizer"),
    (lambda d: (d / "tokenizer" / "tokenizer.json").write_text("{}"), "tokenizer", "cannot load"),
], ids=["truncated-weights", "zero-byte-weights", "config-not-json", "config-wrong-type", "config-missing-key",
        "text-config-wrong-type", "dcsm-head-wrong-size", "weights-do-not-fit", "no-tokenizer", "tokenizer-damaged"])
def test_load_model_of_a_damaged_export_names_the_file_in_one_line(tmp_path, damage, file, message):
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=32, embed_dim=32), make_tokenizer("bert", False, "tiny", CAPTIONS))
    export_model(model, str(tmp_path / "export"))
    damage(tmp_path / "export")
    with pytest.raises(UsageError) as err:
        load_model(str(tmp_path / "export"))
    assert str(tmp_path / "export" / file) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_an_export_replaces_an_earlier_one_only_once_it_is_complete(tmp_path, monkeypatch):
    tokenizer = make_tokenizer("bert", False, "tiny", CAPTIONS)
    first = build_model(ModelConfig(image_size=32, embed_dim=32), tokenizer).eval()
    export_model(first, str(tmp_path / "final"))
    second = build_model(ModelConfig(image_size=32, embed_dim=16), tokenizer).eval()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_model(second, str(tmp_path / "final"))
    assert os.listdir(tmp_path) == ["final"]  # nothing half-written is left beside it
    assert load_model(str(tmp_path / "final")).config.embed_dim == 32  # the earlier export, whole
    monkeypatch.undo()
    export_model(second, str(tmp_path / "final"))
    assert load_model(str(tmp_path / "final")).config.embed_dim == 16
