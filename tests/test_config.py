import glob
import os

import pytest

from clipfromscratch.config import TrainConfig, load_config, read_yaml
from clipfromscratch.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(__file__))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_there_are_recipes():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"demo_cpu.yaml", "coco_xception_bert.yaml", "fashion_vit_gpt2.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_parses(path):
    config = load_config(["--config", path])
    assert set(read_yaml(path)) <= set(vars(config))
    for key, value in read_yaml(path).items():
        assert getattr(config, key) == value


def test_flags_win_over_yaml_and_short_flags_work(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("image_encoder: resnet\nbatch_size: 32\nimage_overrides: {depth: 2}\n")
    config = load_config(["--config", str(recipe), "--batch-size", "8", "--text-enc", "gpt2", "--pretrained-text"])
    assert (config.image_encoder, config.text_encoder, config.batch_size) == ("resnet", "gpt2", 8)
    assert config.pretrained_text is True and config.image_overrides == {"depth": 2}
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
