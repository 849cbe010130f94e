"""--format hf: transformers loads the export offline (AutoModel with the export's remote code, AutoTokenizer,
AutoImageProcessor, the zero-shot pipeline) and gets our embeddings, logit scale and bias."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    pipeline,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from clipfromscratch.config import ModelConfig
from clipfromscratch.dcsm import DenseScorer
from clipfromscratch.errors import UsageError
from clipfromscratch.formats.equality import EQUALITY_TOLERANCE
from clipfromscratch.formats.hf import check_hf, verify_hf, write_hf
from clipfromscratch.model import build_model
from clipfromscratch.text_tokenizers import make_tokenizer, tokenize

CAPTIONS = ["a small red circle on the left", "a blue square above a green triangle", "one large yellow star"] * 10
TEXTS = ["a red star", "one large yellow star on the left of a small blue square"]
LABELS = ["a red circle", "a blue square above a green triangle", "one large yellow star on the left"]
EXPORT_FILES = {"config.json", "modeling_clipfromscratch.py", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "preprocessor_config.json"}
# image tower, text tower, head, loss, other ModelConfig fields: both image tower kinds (timm: a ViT with an
# override over its preset, a ResNet; transformers: clip_vision), the three text towers with their poolings (bert
# cls, gpt2 last, clip_text last), both heads, both losses
KINDS = [("vit", "bert", "linear", "clip", {"image_overrides": {"depth": 2}}),
         ("resnet", "gpt2", "mlp", "siglip", {}),
         ("clip_vision", "clip_text", "mlp", "clip", {"text_pooling": "mean"})]


def _model(image_enc, text_enc, head, loss, fields):
    torch.manual_seed(0)
    config = ModelConfig(image_encoder=image_enc, text_encoder=text_enc, head=head, loss=loss, image_size=32,
                         embed_dim=32, **fields)
    model = build_model(config, make_tokenizer(text_enc, False, "tiny", CAPTIONS)).eval()
    model.encode_text(TEXTS)  # as after training: encoding leaves padding and truncation state in the tokenizer
    return model


def _export(model, directory) -> str:
    check_hf(model)
    write_hf(model, str(directory))
    return str(directory)


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))


@pytest.mark.parametrize("image_enc, text_enc, head, loss, fields", KINDS, ids=[k[0] for k in KINDS])
def test_transformers_loads_the_export_offline_and_gets_our_embeddings(tmp_path, image_enc, text_enc, head, loss,
                                                                       fields):
    model = _model(image_enc, text_enc, head, loss, fields)
    directory = _export(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == EXPORT_FILES
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == ("clipfromscratch_siglip" if loss == "siglip" else "clipfromscratch")
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForZeroShotImageClassification"}
    if image_enc == "vit":  # the preset's timm arguments, the input size, then the override
        assert config["timm_kwargs"] == {"patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4, "img_size": 32}

    loaded = AutoModel.from_pretrained(directory, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert not loaded.training
    tokens = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    ours = tokenize(model.tokenizer, TEXTS, model.config.context_length)
    assert torch.equal(tokens["input_ids"], ours["input_ids"])
    pixels = torch.cat([torch.randn(2, 3, 32, 32), model.preprocess(_image()).unsqueeze(0)])
    with torch.no_grad():
        image_output = loaded.get_image_features(pixels)
        text_output = loaded.get_text_features(tokens["input_ids"], tokens["attention_mask"])
        # padding to a fixed length, as the pipeline does for SigLIP models, changes nothing: the mask hides it
        long = tokenizer(TEXTS, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
        long_text_features = loaded.get_text_features(long["input_ids"], long["attention_mask"]).pooler_output
        output = loaded(input_ids=tokens["input_ids"], pixel_values=pixels, attention_mask=tokens["attention_mask"])
        image_embeds, text_embeds = model.encode_image(pixels), model.encode_text(TEXTS)
        expected_logits = model.logit_scale() * image_embeds @ text_embeds.t()
        if loss == "siglip":
            expected_logits = expected_logits + model.logit_bias
    # as CLIPModel's: an output whose pooler_output is the projected feature, not yet normalised
    assert isinstance(image_output, BaseModelOutputWithPooling) and isinstance(text_output, BaseModelOutputWithPooling)
    exact = {"rtol": 0, "atol": EQUALITY_TOLERANCE}
    torch.testing.assert_close(F.normalize(image_output.pooler_output, dim=-1), image_embeds, **exact)
    torch.testing.assert_close(F.normalize(text_output.pooler_output, dim=-1), text_embeds, **exact)
    torch.testing.assert_close(long_text_features, text_output.pooler_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.image_embeds, image_embeds, **exact)
    torch.testing.assert_close(output.text_embeds, text_embeds, **exact)
    torch.testing.assert_close(output.logits_per_image, expected_logits, rtol=0, atol=1e-3)  # scale ~14 x 1e-4
    assert torch.equal(output.logits_per_text, output.logits_per_image.t())
    assert torch.equal(loaded.log_logit_scale, model.log_logit_scale)
    assert (loaded.logit_bias is None) == (model.logit_bias is None)
    if loss == "siglip":
        assert torch.equal(loaded.logit_bias, model.logit_bias)
    assert verify_hf(model, directory) <= EQUALITY_TOLERANCE


def test_the_image_processor_does_our_evaluation_transform(tmp_path):
    model = _model(*KINDS[0])
    directory = _export(model, tmp_path)
    image = _image()
    ours = model.preprocess(image).unsqueeze(0)
    # the PIL backend resizes with PIL, as torchvision's Resize does a PIL image: the same pixels
    pil = AutoImageProcessor.from_pretrained(directory, backend="pil")(images=[image], return_tensors="pt")
    assert torch.equal(pil["pixel_values"], ours)
    # the default torchvision backend resizes a tensor with its own bicubic filter: a pixel may land a level of
    # 255 or two away (one, on this image)
    default = AutoImageProcessor.from_pretrained(directory)(images=[image], return_tensors="pt")
    assert default["pixel_values"].shape == ours.shape
    assert (default["pixel_values"] - ours).abs().max() <= 2 / 255 / min(model.image_tower.std)


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[1]], ids=["clip-softmax", "siglip-sigmoid"])
def test_the_zero_shot_pipeline_scores_labels_as_our_model(tmp_path, kind):
    model = _model(*kind)
    directory = _export(model, tmp_path)
    loaded = AutoModel.from_pretrained(directory, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(directory)
    classifier = pipeline("zero-shot-image-classification", model=loaded,
                          tokenizer=AutoTokenizer.from_pretrained(directory), image_processor=image_processor)
    result = classifier(_image(), candidate_labels=LABELS, hypothesis_template="{}")
    with torch.no_grad():  # ours on the pixels the pipeline sees, through our own tokenizer
        pixels = image_processor(images=[_image()], return_tensors="pt")["pixel_values"]
        logits = model.logit_scale() * model.encode_image(pixels) @ model.encode_text(LABELS).t()
    # transformers scores SigLIP models (a model type naming siglip) label by label, others over the labels
    scores = torch.sigmoid(logits + model.logit_bias) if kind[3] == "siglip" else logits.softmax(dim=-1)
    expected = sorted(zip(scores[0].tolist(), LABELS), reverse=True)
    assert [r["label"] for r in result] == [label for _, label in expected]
    np.testing.assert_allclose([r["score"] for r in result], [score for score, _ in expected], rtol=1e-4, atol=1e-6)
    # the folder alone, as a pipeline loads it: the same answer
    assert pipeline("zero-shot-image-classification", model=directory, trust_remote_code=True)(
        _image(), candidate_labels=LABELS, hypothesis_template="{}") == result


def test_hf_format_refuses_a_dcsm_head_in_one_line():
    model = _model(*KINDS[0])
    model.dense_scorer = DenseScorer(image_tokens=17, text_tokens=6)
    with pytest.raises(UsageError, match="no DCSM head") as err:
        check_hf(model)
    assert "\n" not in str(err.value)


def test_hf_format_refuses_a_timm_tower_whose_buffers_loading_would_leave_unset():
    model = _model(*KINDS[0])
    model.image_tower.backbone.blocks[0].register_buffer("table", torch.zeros(3), persistent=False)
    with pytest.raises(UsageError, match=r"buffers outside its weights .*\(blocks\.0\.table\)") as err:
        check_hf(model)
    assert "\n" not in str(err.value)


def test_verify_hf_refuses_an_export_that_does_not_give_our_embeddings(tmp_path):
    model = _model(*KINDS[0])
    directory = _export(model, tmp_path)
    with torch.no_grad():
        model.image_head.weight.mul_(-1)
    with pytest.raises(UsageError, match="differ from ours"):
        verify_hf(model, directory)


def test_vision_text_dual_encoder_cannot_hold_our_text_pooling():
    """Why the export is remote code: transformers' VisionTextDualEncoderModel projects the text tower's own
    pooler_output. With our BERT's weights and our linear head as its projection, BERT's pooler (tanh(dense([CLS])),
    which our tower lacks) makes its text features other than ours; GPT-2 has no pooler_output at all."""
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    for text_enc, kind in (("bert", KINDS[0]), ("gpt2", KINDS[1])):
        model = _model(kind[0], text_enc, "linear", "clip", {})
        text_config = model.text_tower.backbone.config
        text = AutoModel.from_config(text_config)
        text.load_state_dict(model.text_tower.backbone.state_dict(), strict=False)
        dual = VisionTextDualEncoderModel(
            config=VisionTextDualEncoderConfig.from_vision_text_configs(vision.config, text_config, projection_dim=32),
            vision_model=vision, text_model=text).eval()
        with torch.no_grad():
            dual.text_projection.weight.copy_(model.text_head.weight)
            tokens = tokenize(model.tokenizer, TEXTS, model.config.context_length)
            if text_enc == "gpt2":
                with pytest.raises(AttributeError, match="pooler_output"):
                    dual.get_text_features(**tokens)
                continue
            theirs = F.normalize(dual.get_text_features(**tokens).pooler_output, dim=-1)
            assert (theirs - model.encode_tokens(**tokens)).abs().max() > 0.1
