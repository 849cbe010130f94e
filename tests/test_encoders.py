import pytest
import torch
from transformers import BertConfig, BertModel

from clipfromscratch.config import ModelConfig
from clipfromscratch.encoders.image import build_image_tower
from clipfromscratch.encoders.text import build_text_tower
from clipfromscratch.errors import UsageError
from clipfromscratch.loss import clip_loss
from clipfromscratch.model import MLPHead, build_model
from clipfromscratch.text_tokenizers import make_tokenizer

CAPTIONS = ["a small red circle on the left", "a blue square above a green triangle", "one large yellow star",
            "there is an orange cross in the middle", "a purple diamond to the right of a pink circle"] * 20


@pytest.fixture(scope="module")
def tokenizers():
    return {name: make_tokenizer(name, False, "tiny", CAPTIONS) for name in ("bert", "gpt2", "clip_text")}


@pytest.mark.parametrize("text_enc", ["bert", "gpt2", "clip_text"])
@pytest.mark.parametrize("image_enc", ["resnet", "vit", "xception", "clip_vision"])
def test_every_pair_trains_every_parameter(image_enc, text_enc, tokenizers):
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_encoder=image_enc, text_encoder=text_enc, image_size=32, embed_dim=16),
                        tokenizers[text_enc])
    for tower in (model.image_tower, model.text_tower):
        assert sum(p.numel() for p in tower.parameters()) < 5_000_000
    images = model.encode_image(torch.randn(3, 3, 32, 32))
    texts = model.encode_text(CAPTIONS[:3])
    assert images.shape == texts.shape == (3, 16)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))
    clip_loss(images, texts, model.logit_scale()).backward()
    # a parameter without a gradient (e.g. BERT's pooler) makes DDP abort
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("text_enc", ["bert", "gpt2", "clip_text"])
def test_text_embedding_does_not_depend_on_padding(text_enc, tokenizers):
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_encoder="resnet", text_encoder=text_enc, image_size=32), tokenizers[text_enc])
    model.eval()
    alone = model.encode_text(["one large yellow star"])
    padded = model.encode_text(["one large yellow star", CAPTIONS[4] + " " + CAPTIONS[1]])[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text_enc, shape", [("bert", (2, 1, 1, 9)), ("gpt2", (2, 1, 9, 9)),
                                             ("clip_text", (2, 1, 9, 9))])
def test_the_tower_builds_the_attention_mask_transformers_would(text_enc, shape, tokenizers):
    """The 4D mask made in the tower (so that transformers never reads the mask back from the device) gives every
    real token the state that transformers' own mask gives it."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_encoder="resnet", text_encoder=text_enc, image_size=32), tokenizers[text_enc])
    model.eval()
    batch = model.tokenizer(["a red circle", "one large yellow star on the left"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.shape == (2, 9) and not mask.all() and model.text_tower.attend(mask).shape == shape
    real = mask.bool()
    torch.testing.assert_close(model.text_tower.forward_tokens(ids, mask)[real],
                               model.text_tower.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[real])


def test_gpt2_pools_the_last_real_token(tokenizers):
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_encoder="resnet", text_encoder="gpt2", image_size=32), tokenizers["gpt2"])
    model.eval()
    batch = model.tokenizer(["a red circle", "one large yellow star on the left"], padding=True, return_tensors="pt")
    hidden = model.text_tower.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    last = batch["attention_mask"].sum(1) - 1
    expected = hidden.last_hidden_state[torch.arange(2), last]
    torch.testing.assert_close(model.text_tower(batch["input_ids"], batch["attention_mask"]), expected)
    assert model.tokenizer.convert_ids_to_tokens(int(batch["input_ids"][0, last[0]])) == "<|endoftext|>"


def test_heads():
    linear = build_model(ModelConfig(image_encoder="resnet", text_encoder="bert", image_size=32, head="linear"),
                         make_tokenizer("bert", False, "tiny", CAPTIONS))
    assert linear.image_head.bias is None
    head = MLPHead(8, 4, dropout=0.0)
    x = torch.randn(5, 8)
    projected = head.projection(x)
    expected = torch.nn.functional.layer_norm(projected + head.fc(torch.nn.functional.gelu(projected)), (4,),
                                              head.norm.weight, head.norm.bias)
    torch.testing.assert_close(head(x), expected)


def test_presets_and_overrides():
    vit = build_image_tower("vit", "tiny", False, 32, {"depth": 2})
    assert len(vit.backbone.blocks) == 2 and vit.num_features == 128
    assert build_image_tower("vit", "base", False, 224, {}).num_features == 768  # ViT-B/16
    assert build_image_tower("test_resnet", "tiny", False, 32, {}).num_features > 0  # any timm name


def test_unknown_names_fail_in_one_line_with_the_choices():
    with pytest.raises(UsageError, match="unknown image encoder 'vgg-nope'.*resnet, vit, xception"):
        build_image_tower("vgg-nope", "tiny", False, 32, {})
    with pytest.raises(UsageError, match="unknown model size 'huge'"):
        build_image_tower("vit", "huge", False, 32, {})
    with pytest.raises(UsageError, match="text encoder directory not found"):
        build_text_tower("./no/such/dir", None, False, None)


def test_pretrained_offline_fails_in_one_line():
    with pytest.raises(UsageError, match="cannot load pretrained text tower 'bert-base-uncased'") as err:
        build_text_tower("bert", None, True, None)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="cannot load pretrained weights") as err:
        build_image_tower("resnet", "tiny", True, 32, {})
    assert "\n" not in str(err.value)


def test_pretrained_text_tower_from_a_local_directory(tmp_path):
    tokenizer = make_tokenizer("bert", False, "tiny", CAPTIONS)
    saved = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64), add_pooling_layer=False)
    saved.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = ModelConfig(image_encoder="resnet", text_encoder=str(tmp_path), pretrained_text=True, image_size=32)
    loaded_tokenizer = make_tokenizer(str(tmp_path), True, "tiny", [])
    assert loaded_tokenizer("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]
    model = build_model(config, loaded_tokenizer)
    torch.testing.assert_close(model.text_tower.backbone.embeddings.word_embeddings.weight,
                               saved.embeddings.word_embeddings.weight)
    assert model.text_tower.pooling == "mean"  # an unregistered architecture pools by mean unless told


def test_clip_vision_tower_groups_its_layers_and_pools_its_class_token():
    """transformers' CLIP ViT as a registered tower: the embeddings and pre-norm first, one group per layer with the
    post-norm in the last, token 0 of `forward_tokens` the pooled feature, and checkpointing that keeps gradients."""
    torch.manual_seed(0)
    tower = build_image_tower("clip_vision", "tiny", False, 32, {"num_hidden_layers": 3})
    groups = tower.layer_groups()
    assert len(groups) == 4
    names = {id(p): n for n, p in tower.backbone.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in groups[0]} == {"embeddings", "pre_layrnorm"}
    assert any(names[id(p)].startswith("post_layernorm") for p in groups[-1])
    pixels = torch.randn(2, 3, 32, 32)
    tower.eval()
    torch.testing.assert_close(tower.forward_tokens(pixels)[:, 0], tower(pixels))
    assert tower.forward_tokens(pixels).shape == (2, 1 + 16, 128)
    tower.train()
    tower.enable_grad_checkpointing()
    tower(pixels).sum().backward()
    assert all(p.grad is not None for p in tower.parameters())
    with pytest.raises(UsageError, match="made for 64 px images, not 32"):
        build_image_tower("clip_vision", "tiny", False, 32, {"image_size": 64})
    with pytest.raises(UsageError, match="patch-dropout needs a timm ViT"):
        build_image_tower("clip_vision", "tiny", False, 32, {}, patch_dropout=0.5)
