"""Models in and out of open_clip's format, and `--init` from published CLIPs: each round trip gives the same
embeddings (max abs difference under 1e-4 in fp32) and temperature; what a format cannot hold is one line."""
import json
import os
import shutil
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from test_eval_models import save_tiny_openai
from transformers import AutoModel, CLIPModel

from clipfromscratch import load_model
from clipfromscratch.config import ModelConfig
from clipfromscratch.dcsm import DenseScorer
from clipfromscratch.errors import UsageError
from clipfromscratch.eval.cli import main as command
from clipfromscratch.eval.models import load_eval_model
from clipfromscratch.export import export_model
from clipfromscratch.formats import export_as
from clipfromscratch.formats.published import architecture, published_model
from clipfromscratch.model import build_model
from clipfromscratch.text_tokenizers import make_tokenizer

CAPTIONS = ["a small red circle on the left", "a blue square above a green triangle", "one large yellow star"] * 10
QUERIES = ["a red dress with long sleeves", "Two dogs, playing in the snow!", "one large yellow star"]
# for the tiny OpenAI-style tokenizer, whose vocabulary has these words' characters only (an unknown character
# would be its end-of-text token, where transformers' CLIP pools)
OPENAI_QUERIES = ["a photo of the red circle.", "a blue square", "the green star of a triangle"]
TOLERANCE = dict(atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def openai_clip_dir(tmp_path_factory) -> str:
    return save_tiny_openai(tmp_path_factory.mktemp("openai-clip"))


@pytest.fixture(scope="module")
def native_open_clip_dir(tmp_path_factory) -> str:
    """A tiny random open_clip model of its own kind (its ViT and text transformer, OpenAI's BPE tokenizer) as an
    open_clip `local-dir:` folder, its weights nudged off their initial values so that every bias and norm counts."""
    directory = tmp_path_factory.mktemp("open-clip-native")
    config = {"embed_dim": 32, "quick_gelu": True,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{directory}")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(directory / "open_clip_model.safetensors"))
    return str(directory)


def _model(image_enc: str = "test_vit", text_enc: str = "bert", **fields):
    torch.manual_seed(0)
    config = ModelConfig(image_encoder=image_enc, text_encoder=text_enc, embed_dim=32, **fields)
    return build_model(config, make_tokenizer(text_enc, False, "tiny", CAPTIONS)).eval()


def _pixels(model, count: int = 2) -> torch.Tensor:
    size = model.config.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("image_enc, pooling, loss", [("test_vit", "cls", "clip"), ("test_resnet", "mean", "siglip")])
def test_open_clip_loads_our_export_with_the_same_embeddings(tmp_path, image_enc, pooling, loss):
    model = _model(image_enc, text_pooling=pooling, loss=loss)
    out = str(tmp_path / "oc")
    assert export_as(model, "open_clip", out) < 1e-4
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    theirs.eval()
    pixels = _pixels(model)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(pixels, normalize=True), model.encode_image(pixels), **TOLERANCE)
        torch.testing.assert_close(theirs.encode_text(tokenizer(QUERIES), normalize=True), model.encode_text(QUERIES),
                                   **TOLERANCE)
    torch.testing.assert_close(theirs.logit_scale.exp(), model.logit_scale())
    if loss == "siglip":
        torch.testing.assert_close(theirs.logit_bias, model.logit_bias)
    image = Image.new("RGB", (300, 200), (200, 40, 10))
    torch.testing.assert_close(preprocess(image), model.preprocess(image))  # the same resize, crop and normalisation


def test_eval_reads_an_open_clip_export_as_an_openclip_model(tmp_path):
    model = _model("test_resnet")
    export_as(model, "open_clip", str(tmp_path / "oc"))
    theirs = load_eval_model(f"openclip:{tmp_path / 'oc'}")
    pixels = _pixels(model)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(pixels), model.encode_image(pixels), **TOLERANCE)
        torch.testing.assert_close(theirs.encode_text(QUERIES), model.encode_text(QUERIES), **TOLERANCE)


@pytest.mark.parametrize("change, reason", [
    (dict(image_enc="vit"), "tiny vit preset is built with timm arguments"),
    (dict(image_overrides={"drop_rate": 0.1}), "image_overrides"),
    (dict(image_enc="clip_vision"), "not a timm model"),
    (dict(text_enc="gpt2"), "no Hugging Face text tower of type gpt2"),
    (dict(head="mlp"), "mlp head"),
    (dict(text_pooling="last"), "text pooling 'last' has no open_clip pooler"),
    (dict(dcsm=True), "no DCSM head"),
])
def test_what_open_clip_cannot_hold_is_refused_before_writing(tmp_path, change, reason):
    change = dict(change)
    dcsm = change.pop("dcsm", False)
    model = _model(change.pop("image_enc", "test_vit"), change.pop("text_enc", "bert"), **change)
    if dcsm:
        model.dense_scorer = DenseScorer(image_tokens=4, text_tokens=4)
    with pytest.raises(UsageError, match=reason):
        export_as(model, "open_clip", str(tmp_path / "oc"))
    assert os.listdir(tmp_path) == []


def _features(published: CLIPModel, pixels: torch.Tensor, tokens: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        images, texts = published.get_image_features(pixel_values=pixels), published.get_text_features(**tokens)
    # transformers 5 returns the projected features as pooler_output, 4 as a tensor
    return (F.normalize(getattr(images, "pooler_output", images), dim=-1),
            F.normalize(getattr(texts, "pooler_output", texts), dim=-1))


def test_init_openai_starts_from_the_published_model(openai_clip_dir):
    config = architecture(ModelConfig(init=f"openai:{openai_clip_dir}"))
    assert (config.image_encoder, config.text_encoder, config.image_size, config.embed_dim, config.context_length) == \
        ("clip_vision", "clip_text", 32, 16, 40)
    model = published_model(config).eval()
    published = CLIPModel.from_pretrained(openai_clip_dir).eval()
    pixels, tokens = _pixels(model), model.tokenizer(OPENAI_QUERIES, padding=True, return_tensors="pt")
    images, texts = _features(published, pixels, tokens)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), images, **TOLERANCE)
        torch.testing.assert_close(model.encode_text(OPENAI_QUERIES), texts, **TOLERANCE)
    torch.testing.assert_close(model.logit_scale(), published.logit_scale.exp())


def test_init_openclip_converts_open_clips_own_towers(native_open_clip_dir):
    theirs = open_clip.create_model(f"local-dir:{native_open_clip_dir}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{native_open_clip_dir}")
    model = published_model(architecture(ModelConfig(init=f"openclip:{native_open_clip_dir}"))).eval()
    assert model.config.context_length == 16
    assert model.tokenizer(QUERIES[1])["input_ids"] == [t for t in tokenizer(QUERIES[1])[0].tolist() if t]
    pixels = _pixels(model)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), theirs.encode_image(pixels, normalize=True), **TOLERANCE)
        torch.testing.assert_close(model.encode_text(QUERIES), theirs.encode_text(tokenizer(QUERIES), normalize=True),
                                   **TOLERANCE)
    torch.testing.assert_close(model.logit_scale(), theirs.logit_scale.exp())


def test_our_open_clip_export_comes_back_through_init(tmp_path):
    model = _model("test_resnet", text_pooling="mean", loss="siglip")
    export_as(model, "open_clip", str(tmp_path / "oc"))
    config = architecture(ModelConfig(init=f"openclip:{tmp_path / 'oc'}"))
    assert (config.image_encoder, config.text_encoder, config.text_pooling, config.loss) == \
        ("test_resnet", "bert", "mean", "siglip")
    back = published_model(config).eval()
    pixels = _pixels(model)
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(pixels), model.encode_image(pixels), **TOLERANCE)
        torch.testing.assert_close(back.encode_text(QUERIES), model.encode_text(QUERIES), **TOLERANCE)
    torch.testing.assert_close(back.logit_bias, model.logit_bias)


@pytest.mark.parametrize("init, message", [
    ("laion:ViT-B-32", "write openai:"),
    ("openai:/no/such/folder", "folder not found"),
    ("openai:" + os.path.dirname(__file__), "no config.json there"),
    ("openclip:ViT-B-32", "write --init openclip:<arch>/<pretrained tag or file>"),
])
def test_a_bad_init_is_one_line(init, message):
    with pytest.raises(UsageError, match=message):
        architecture(ModelConfig(init=init))


def test_export_command(tmp_path, capsys):
    run = tmp_path / "run"
    export_model(_model(), str(run / "final"))  # a run folder holds its export in final/
    assert command(["export", "--model", str(run), "--format", "open_clip", "--output", str(tmp_path / "oc")]) == 0
    assert "open_clip export" in capsys.readouterr().out
    assert json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 32
    # never into a folder holding other files; a model the format cannot hold leaves nothing behind
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert command(["export", "--model", str(run), "--format", "open_clip", "--output", str(tmp_path / "busy")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    export_model(_model("vit"), str(tmp_path / "tiny-vit"))
    assert command(["export", "--model", str(tmp_path / "tiny-vit"), "--format", "open_clip", "--output",
                    str(tmp_path / "refused")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "refused").exists()


def test_an_openai_init_exports_and_reloads(tmp_path, openai_clip_dir):
    model = published_model(architecture(ModelConfig(init=f"openai:{openai_clip_dir}"))).eval()
    export_model(model, str(tmp_path / "ours"))
    loaded = load_model(str(tmp_path / "ours"))
    assert loaded.config.init is None  # rebuilt offline from the export, never from the source again
    pixels = _pixels(model)
    torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_text(OPENAI_QUERIES), model.encode_text(OPENAI_QUERIES), rtol=0, atol=0)


PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_with_probe.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_fine_tuning_an_openai_clip_under_ddp_with_locks_layer_decay_and_ema(tmp_path, openai_clip_dir):
    """`--init openai:` as users run it: 2 gloo ranks, the text tower locked but its last layer, layer decay and EMA,
    resumed (without the source), compared with the model it started from, then exported to transformers and
    loaded back."""
    run, source = tmp_path / "run", tmp_path / "source"
    shutil.copytree(openai_clip_dir, source)
    flags = ["--init", f"openai:{source}", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
             "--batch-size", "8", "--num-workers", "0", "--synthetic-train-samples", "256",
             "--synthetic-val-samples", "16", "--warmup-steps", "1", "--lock-text", "--lock-text-unlocked-layers", "1",
             "--layer-decay", "0.8", "--ema-decay", "0.9", "--output-dir", str(run)]
    env = {**os.environ, "RANK_PROBE": str(tmp_path / "probe")}
    for steps, extra in (("3", []), ("5", ["--resume", str(run)])):
        done = subprocess.run([sys.executable, PROBE, *flags, "--max-steps", steps, *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        shutil.rmtree(source, ignore_errors=True)  # a resumed run needs nothing of the source any more
    assert json.loads((run / "metrics.json").read_text())["step"] == 5
    ranks = [json.loads((tmp_path / f"probe.rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0] == ranks[1]  # one tokenizer (the published one), the same weights

    trained = load_model(str(run / "final"))
    published = CLIPModel.from_pretrained(openai_clip_dir)
    assert trained.config.image_encoder == "clip_vision"
    torch.testing.assert_close(trained.text_tower.backbone.embeddings.token_embedding.weight,
                               published.text_model.embeddings.token_embedding.weight)  # locked
    assert not torch.equal(trained.image_head.weight, published.visual_projection.weight)  # trained

    # the fine-tuned model beside the one it started from, as a baseline
    assert command(["compare", "--models", str(run / "final"), f"openai:{openai_clip_dir}", "--tasks", "zeroshot",
                    "--data", "synthetic", "--label", "colour", "--num-samples", "40",
                    "--output-dir", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.md").is_file()
    assert command(["export", "--model", str(run), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    hf_model = AutoModel.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    pixels = _pixels(trained)
    tokens = trained.tokenizer(OPENAI_QUERIES, padding=True, return_tensors="pt")
    images, texts = _features(hf_model, pixels, {"input_ids": tokens["input_ids"],
                                                 "attention_mask": tokens["attention_mask"]})
    with torch.no_grad():
        torch.testing.assert_close(images, trained.encode_image(pixels), **TOLERANCE)
        torch.testing.assert_close(texts, trained.encode_text(OPENAI_QUERIES), **TOLERANCE)
