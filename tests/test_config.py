import glob
import os

import pytest
import torch
from torch import nn

from clipfromscratch.config import TrainConfig, load_config, read_yaml, save_config
from clipfromscratch.errors import UsageError
from clipfromscratch.model import MLPHead, build_model
from clipfromscratch.text_tokenizers import make_tokenizer

ROOT = os.path.dirname(os.path.dirname(__file__))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
# the timm and transformers classes a tower name builds (text: and how it pools)
IMAGE_BACKBONES = {"resnet": "ResNet", "vit": "VisionTransformer", "xception": "XceptionAligned",
                   "vit_large_patch14_clip_224": "VisionTransformer"}  # a timm name: built at its own size
TEXT_BACKBONES = {"bert": ("BertModel", "cls"), "gpt2": ("GPT2Model", "last")}


def test_there_are_recipes():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"demo_cpu.yaml", "coco_xception_bert.yaml", "fashion_vit_gpt2.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_builds_the_towers_and_heads_it_names(path):
    recipe = read_yaml(path)
    config = load_config(["--config", path, "--model-size", "tiny"]).model  # the recipe's families, at test size
    torch.manual_seed(0)
    model = build_model(config, make_tokenizer(config.text_encoder, False, "tiny", ["a red circle", "a blue square"]))
    assert type(model.image_tower.backbone).__name__ == IMAGE_BACKBONES[recipe["image_encoder"]]
    text_class, pooling = TEXT_BACKBONES[recipe["text_encoder"]]
    assert (type(model.text_tower.backbone).__name__, model.text_tower.pooling) == (text_class, pooling)
    head = MLPHead if recipe.get("head") == "mlp" else nn.Linear
    assert isinstance(model.image_head, head) and isinstance(model.text_head, head)
    width, side = recipe.get("embed_dim", 256), model.config.image_size  # 256: ModelConfig's default
    with torch.no_grad():
        assert model.encode_image(torch.zeros(2, 3, side, side)).shape == (2, width)
        assert model.encode_text(["a red circle", "a blue square"]).shape == (2, width)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_parses(path):
    config = load_config(["--config", path]).flat()
    for key, value in read_yaml(path).items():
        assert config[key] == value


def test_flags_win_over_yaml_and_short_flags_work(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("image_encoder: resnet\nbatch_size: 32\nimage_overrides: {depth: 2}\n")
    config = load_config(["--config", str(recipe), "--batch-size", "8", "--text-enc", "gpt2", "--pretrained-text"])
    assert (config.model.image_encoder, config.model.text_encoder, config.data.batch_size) == ("resnet", "gpt2", 8)
    assert config.model.pretrained_text is True and config.model.image_overrides == {"depth": 2}
    assert load_config([]) == TrainConfig()


@pytest.mark.parametrize("yaml_text, message", [
    ("batch_sise: 8\n", "unknown option 'batch_sise'.*did you mean 'batch_size'"),
    ("batch_size: many\n", "option batch_size expects int, got 'many'"),
    ("head: conv\n", "option head is 'conv': choose one of linear, mlp"),
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [\n", "is not valid YAML"),
])
def test_bad_yaml_fails_in_one_line(tmp_path, yaml_text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml_text)
    with pytest.raises(UsageError, match=message) as err:
        load_config(["--config", str(recipe)])
    assert "\n" not in str(err.value)


def test_missing_config_file():
    with pytest.raises(UsageError, match="config file not found: nope.yaml"):
        load_config(["--config", "nope.yaml"])


def test_optional_values_take_none_and_the_rest_their_type(tmp_path):
    assert load_config(["--gradient-clip-val", "none"]).optim.gradient_clip_val is None
    recipe = tmp_path / "r.yaml"
    recipe.write_text("gradient_clip_val: null\nimage_size: 48\n")
    config = load_config(["--config", str(recipe)])
    assert config.optim.gradient_clip_val is None and config.model.image_size == 48
    for flags, message in ((["--batch-size", "2.5"], "option batch_size expects int, got '2.5'"),
                           (["--lr", "true"], "option lr expects float, got 'true'"),
                           (["--embed-dim", "none"], "option embed_dim expects int, got 'none'"),
                           (["--plateau-factor", "1"], "option plateau_factor is 1.0: it must be above 0 and below 1"),
                           (["--max-steps", "-1"], "set --max-steps or --max-epochs")):
        with pytest.raises(UsageError, match=message):
            load_config(flags)


def test_a_saved_config_is_a_recipe_that_gives_the_same_config(tmp_path):
    config = load_config(["--embed-dim", "64", "--gradient-clip-val", "none", "--image-overrides", '{"depth": 2}',
                          "--precision", "bf16-mixed", "--devices", "0,1"])
    save_config(config, str(tmp_path / "config.yaml"))
    assert load_config(["--config", str(tmp_path / "config.yaml")]) == config
    assert (config.model.embed_dim, config.data.batch_size, config.run.devices) == (64, 64, "0,1")
