"""The model adapters: ours (export, checkpoint, CLIP_benchmark loader) and OpenAI CLIP from a saved folder."""
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from clipfromscratch.config import ModelConfig, OptimConfig
from clipfromscratch.errors import UsageError
from clipfromscratch.eval.callback import ZeroShotCallback
from clipfromscratch.eval.embed import encode_images
from clipfromscratch.eval.models import from_clip, load_clip_benchmark, load_eval_model
from clipfromscratch.eval.tasks import EvalOptions, Evaluation, zeroshot, zeroshot_logits
from clipfromscratch.eval.templates import load_templates
from clipfromscratch.export import export_model, load_model
from clipfromscratch.lit_module import CLIPModule
from clipfromscratch.model import build_model
from clipfromscratch.text_tokenizers import make_tokenizer

WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "star", "the", "."]
CAPTIONS = ["a small red circle on the left", "a blue square above a green triangle", "one large yellow star"] * 10


def save_tiny_openai(directory) -> str:
    """A random 2-layer CLIPModel with a character-level CLIP tokenizer and a 32 px processor, as on the hub."""
    chars = sorted(set("".join(WORDS)))
    vocab = {token: i for i, token in enumerate(
        [*chars, *(c + "</w>" for c in chars), *(w + "</w>" for w in WORDS if len(w) > 1),
         "<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    end = vocab["<|endoftext|>"]
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 40,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": end, "pad_token_id": end},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16)
    CLIPModel(config).save_pretrained(directory)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(directory)
    return str(directory)


def export_tiny_ours(directory, seed: int = 0) -> str:
    torch.manual_seed(seed)
    config = ModelConfig(image_encoder="vit", text_encoder="bert", image_size=32, embed_dim=32)
    export_model(build_model(config, make_tokenizer("bert", False, "tiny", CAPTIONS)).eval(), str(directory))
    return str(directory)


def coloured_images() -> list[tuple[Image.Image, int]]:
    return [(Image.new("RGB", (40 + 3 * i, 36), colour), i) for i, colour in
            enumerate([(220, 30, 30), (30, 30, 220), (30, 200, 40), (240, 240, 240)])]


def test_openai_zeroshot_logits_equal_the_transformers_ones(tmp_path):
    source = save_tiny_openai(tmp_path)
    model = load_eval_model(f"openai:{source}")
    classnames = ["red circle", "blue square", "green triangle"]
    samples = coloured_images()
    features, targets = encode_images(model, samples, batch_size=3)
    assert targets == [0, 1, 2, 3]
    ours = zeroshot_logits(model, features, classnames, load_templates("simple"))

    reference_model, processor = CLIPModel.from_pretrained(source).eval(), CLIPProcessor.from_pretrained(source)
    inputs = processor(text=[f"a photo of a {c}." for c in classnames], images=[image for image, _ in samples],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = reference_model(**inputs).logits_per_image
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert ours.std() > 0  # a model that says the same for every pair would match trivially


def test_our_export_and_checkpoint_and_clip_benchmark_loader_agree(tmp_path):
    export = export_tiny_ours(tmp_path / "export")
    from_export = load_eval_model(export)
    # a Lightning checkpoint: the module's state under "model." plus what on_save_checkpoint adds to rebuild it
    module = CLIPModule(load_model(export), OptimConfig())
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    from_checkpoint = load_eval_model(str(tmp_path / "last.ckpt"))

    texts = ["a red circle", "one large yellow star"]
    pixels = from_export.preprocess(Image.new("RGB", (40, 40), (200, 30, 30))).unsqueeze(0)
    torch.testing.assert_close(from_checkpoint.encode_text(texts), from_export.encode_text(texts))
    torch.testing.assert_close(from_checkpoint.encode_image(pixels), from_export.encode_image(pixels))

    model, transform, tokenizer = load_clip_benchmark(export, pretrained=None, cache_dir=None, device="cpu")
    with torch.no_grad():  # the calls CLIP_benchmark makes
        benchmark_text = model.encode_text(tokenizer(texts).to("cpu"))
        benchmark_image = model.encode_image(transform(Image.new("RGB", (40, 40), (200, 30, 30))).unsqueeze(0))
    torch.testing.assert_close(benchmark_text, from_export.encode_text(texts))
    torch.testing.assert_close(benchmark_image, from_export.encode_image(pixels))


def test_openclip_model_from_a_checkpoint_file(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-S-32-alt").eval()  # the smallest config open_clip ships
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    model = load_eval_model(f"openclip:ViT-S-32-alt/{tmp_path / 'weights.pt'}")
    pixels = model.preprocess(Image.new("RGB", (50, 40), (200, 30, 30))).unsqueeze(0)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_image(pixels), dim=-1)
        torch.testing.assert_close(model.encode_image(pixels), expected)
        assert model.encode_text(["a red photo", "a blue photo"]).norm(dim=-1).tolist() == pytest.approx([1, 1])


@pytest.mark.parametrize("spec, message", [
    ("no/such/dir", "unknown model"),
    ("openai:/no/such/dir", "cannot load openai:"),
    ("openai:", "cannot load openai:"),
    ("openclip:ViT-B-32", "openclip:"),  # no pretrained tag (or, without open_clip, no package)
])
def test_bad_model_specs_are_one_line_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        load_eval_model(spec)


def test_zeroshot_callback_logs_every_nth_validation(tmp_path, monkeypatch):
    module = CLIPModule(load_model(export_tiny_ours(tmp_path)), OptimConfig())
    logged = []
    monkeypatch.setattr(module, "log", lambda key, value: logged.append((key, value)))
    callback = ZeroShotCallback("shapes", EvalOptions(data="synthetic", label="shape", num_samples=40),
                                every_n_validations=2)
    trainer = SimpleNamespace(sanity_checking=False)
    for _ in range(4):
        callback.on_validation_epoch_end(trainer, module)
    assert [key for key, _ in logged] == ["val/zeroshot_shapes_acc1"] * 2
    expected = zeroshot(Evaluation(from_clip(module.model, "m"), callback.options)).metrics["acc1"]
    assert logged[0][1] == expected and 0 <= expected <= 1
