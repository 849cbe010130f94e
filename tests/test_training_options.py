"""The training options taken from open_clip and big_vision: each one does what it says, from the command line to
the export, and fails in one line where it cannot apply."""
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.callbacks import ModelSummary
from safetensors.torch import load_file

from clipfromscratch import load_model
from clipfromscratch.callbacks import StepProgressBar
from clipfromscratch.cli import main
from clipfromscratch.config import ModelConfig, OptimConfig, load_config
from clipfromscratch.errors import UsageError
from clipfromscratch.eval.models import from_clip
from clipfromscratch.eval.tasks import zeroshot_logits
from clipfromscratch.export import read_checkpoint
from clipfromscratch.lit_module import CLIPModule
from clipfromscratch.model import build_model
from clipfromscratch.text_tokenizers import make_tokenizer
from clipfromscratch.trainer import build_trainer
from clipfromscratch.training import compile_towers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red circle above a blue square", "a green star", "no yellow triangle here"] * 10
TINY = ["--image-size", "32", "--batch-size", "8", "--embed-dim", "16", "--num-workers", "0",
        "--synthetic-train-samples", "64", "--synthetic-val-samples", "16", "--warmup-steps", "1"]


def _model(**fields):
    torch.manual_seed(0)
    config = ModelConfig(image_size=32, embed_dim=16, **fields)
    return build_model(config, make_tokenizer(config.text_encoder, False, "tiny", CAPTIONS))


def _train(out, steps: int, *extra: str) -> int:
    return main(["--output-dir", str(out), "--max-steps", str(steps), "--val-every-n-steps", str(steps), *TINY,
                 *extra])


# SigLIP


def test_a_siglip_model_starts_as_siglip_and_keeps_its_bias_free_of_weight_decay():
    model = _model(loss="siglip")
    assert math.isclose(model.logit_scale().item(), 10, rel_tol=1e-6) and model.logit_bias.item() == -10
    assert _model().logit_bias is None and math.isclose(1 / _model().logit_scale().item(), 0.07, rel_tol=1e-6)
    groups = CLIPModule(model, OptimConfig(lr_schedule="constant")).configure_optimizers().param_groups
    [bias_group] = [g for g in groups if any(p is model.logit_bias for p in g["params"])]
    assert bias_group["weight_decay"] == 0.0 and any(g["weight_decay"] > 0 for g in groups)


def test_siglip_trains_with_feature_cached_accumulation_exports_and_gives_sigmoid_probabilities(tmp_path):
    assert _train(tmp_path / "run", 3, "--loss", "siglip", "--accum-freq", "2") == 0
    model = load_model(tmp_path / "run" / "final")
    assert model.config.loss == "siglip" and model.logit_bias.item() != -10  # trained, saved, reloaded
    wrapped = from_clip(model.eval(), "siglip")
    with torch.no_grad():
        logits = zeroshot_logits(wrapped, model.encode_image(torch.randn(3, 3, 32, 32)), ["circle", "star"],
                                 [lambda c: f"a {c}"])
    probabilities = wrapped.probabilities(logits)
    torch.testing.assert_close(probabilities, torch.sigmoid(logits))
    assert not torch.allclose(probabilities.sum(-1), torch.ones(3))  # independent pairs, not a softmax
    clip = from_clip(_model().eval(), "clip")
    torch.testing.assert_close(clip.probabilities(logits).sum(-1), torch.ones(3))


# patch dropout


def _tokens_seen(model, training: bool) -> int:
    seen = []
    hook = model.image_tower.backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    model.train(training)
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, 32, 32))
    hook.remove()
    return seen[0][1]


def test_patch_dropout_drops_patches_in_training_only():
    model = _model(patch_dropout=0.5)
    assert _tokens_seen(model, training=False) == 1 + 16  # CLS and the 4 x 4 patches of 8 px
    assert _tokens_seen(model, training=True) == 1 + 8
    assert _tokens_seen(_model(), training=True) == 1 + 16


def test_patch_dropout_on_a_tower_without_patches_is_one_line(tmp_path, capsys):
    with pytest.raises(UsageError, match="needs a ViT-style image tower"):
        _model(image_encoder="resnet", patch_dropout=0.5)
    assert _train(tmp_path / "run", 1, "--image-enc", "resnet", "--patch-dropout", "0.5") == 2
    assert "--patch-dropout needs a ViT-style image tower" in capsys.readouterr().err
    assert _train(tmp_path / "run", 1, "--patch-dropout", "1") == 2
    assert "option patch_dropout is 1.0: it must be at least 0 and below 1" in capsys.readouterr().err


# EMA


@pytest.mark.slow
def test_ema_weights_are_validated_exported_and_resumed_exactly(tmp_path):
    constant = ("--lr-schedule", "constant")  # a schedule that does not depend on --max-steps, for the resumes
    assert _train(tmp_path / "raw", 4, *constant) == 0
    assert _train(tmp_path / "ema", 4, *constant, "--ema-decay", "0.5") == 0
    raw = read_checkpoint(str(tmp_path / "raw" / "last.ckpt"))["state_dict"]
    ema = read_checkpoint(str(tmp_path / "ema" / "last.ckpt"))
    for name, value in raw.items():  # the average does not change training: the raw weights are the plain run's
        torch.testing.assert_close(ema["current_model_state"][name], value, rtol=0, atol=0, msg=name)
    head = "model.image_head.weight"
    assert not torch.equal(ema["state_dict"][head], raw[head]) and int(ema["averaging_state"]["n_averaged"]) == 4
    exported = load_file(tmp_path / "ema" / "final" / "model.safetensors")
    torch.testing.assert_close(exported["image_head.weight"], ema["state_dict"][head], rtol=0, atol=0)

    shutil.copytree(tmp_path / "ema", tmp_path / "resumed")
    assert main(["--resume", str(tmp_path / "resumed"), "--max-steps", "4"]) == 0  # restores, trains no step
    restored = read_checkpoint(str(tmp_path / "resumed" / "last.ckpt"))
    for key in ("state_dict", "current_model_state"):
        for name, value in ema[key].items():
            torch.testing.assert_close(restored[key][name], value, rtol=0, atol=0, msg=f"{key} {name}")
    assert main(["--resume", str(tmp_path / "resumed"), "--max-steps", "6"]) == 0
    assert int(read_checkpoint(str(tmp_path / "resumed" / "last.ckpt"))["averaging_state"]["n_averaged"]) == 6


# torch.compile


@pytest.mark.slow
def test_compiled_towers_train_checkpoint_resume_and_export_with_plain_names(tmp_path):
    assert _train(tmp_path / "run", 2, "--compile") == 0
    assert main(["--resume", str(tmp_path / "run"), "--max-steps", "3"]) == 0
    checkpoint = read_checkpoint(str(tmp_path / "run" / "last.ckpt"))
    exported = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert checkpoint["global_step"] == 3
    assert not [k for k in [*checkpoint["state_dict"], *exported] if "_orig_mod" in k]
    assert load_model(tmp_path / "run" / "final").encode_text(["a red circle"]).shape == (1, 16)


@pytest.mark.slow
def test_compile_siglip_and_ema_under_two_process_ddp(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, os.path.join(REPO, "train.py"), "--output-dir", str(run), "--max-steps", "2",
               "--val-every-n-steps", "2", *TINY, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
               "--compile", "--loss", "siglip", "--ema-decay", "0.5"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = read_checkpoint(str(run / "last.ckpt"))
    assert checkpoint["global_step"] == 2 and int(checkpoint["averaging_state"]["n_averaged"]) == 2
    assert not [k for k in load_file(run / "final" / "model.safetensors") if "_orig_mod" in k]
    assert load_model(run / "final").logit_bias is not None


def test_compile_compiles_both_towers_or_falls_back_in_one_line(monkeypatch, capsys):
    model = _model()
    compile_towers(model)
    assert model.image_tower._compiled_call_impl is not None and model.text_tower._compiled_call_impl is not None

    def cannot_compile(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python\nmore detail")

    monkeypatch.setattr(torch, "compile", cannot_compile)
    eager = _model()
    capsys.readouterr()
    compile_towers(eager)
    assert eager.image_tower._compiled_call_impl is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training eager (Dynamo is not supported on this Python)" in err


# partial unlocking and layer-wise lr decay


@pytest.mark.parametrize("image_enc", ["vit", "resnet"])
def test_unlocked_groups_and_layers_train_and_the_rest_stays_frozen(image_enc):
    model = _model(image_encoder=image_enc, text_encoder="gpt2")
    model.lock_towers(True, True, image_unlocked_groups=1, text_unlocked_layers=1)
    image_groups, text_groups = model.image_tower.layer_groups(), model.text_tower.layer_groups()
    for groups in (image_groups, text_groups):
        assert all(p.requires_grad for p in groups[-1]) and not any(p.requires_grad for g in groups[:-1] for p in g)
    final_norm = model.text_tower.backbone.ln_f.weight
    assert any(p is final_norm for p in text_groups[-1])  # GPT-2's final norm trains with its last layer
    model.train()
    if image_enc == "resnet":  # frozen BatchNorm statistics stay put; the unlocked stage's move
        assert not model.image_tower.backbone.bn1.training and model.image_tower.backbone.layer4[0].bn1.training
    assert all(p.requires_grad for p in model.image_head.parameters())


def test_unlocking_needs_a_locked_tower_and_something_left_locked(tmp_path, capsys):
    assert _train(tmp_path / "run", 1, "--lock-text-unlocked-layers", "1") == 2
    assert "applies to a locked tower: add --lock-text" in capsys.readouterr().err
    with pytest.raises(UsageError, match="leave nothing of the 3 layer groups of the text tower locked"):
        _model().lock_towers(False, True, text_unlocked_layers=3)


def test_layer_decay_scales_each_layer_groups_lr_from_the_top():
    model = _model()
    groups = CLIPModule(model, OptimConfig(lr=1.0, layer_decay=0.5, lr_schedule="constant")
                        ).configure_optimizers().param_groups
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    image = model.image_tower.layer_groups()  # stem, 4 blocks
    assert [lr_of[id(g[0])] for g in image] == [0.5 ** 5, 0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5]
    assert [lr_of[id(g[0])] for g in model.text_tower.layer_groups()] == [0.5 ** 3, 0.5 ** 2, 0.5]
    assert lr_of[id(model.image_head.weight)] == lr_of[id(model.log_logit_scale)] == 1.0
    plain = CLIPModule(model, OptimConfig(lr=1.0, lr_schedule="constant")).configure_optimizers().param_groups
    # without layer decay: the two groups, decayed first, so the clipped norm sums in the same order as ever
    assert [(g["lr"], g["weight_decay"]) for g in plain] == [(1.0, OptimConfig.weight_decay), (1.0, 0.0)]


def test_options_have_flags_yaml_keys_and_checked_values(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss: siglip\nema_decay: 0.9\nlayer_decay: 0.8\ncompile: false\npatch_dropout: 0.25\n")
    config = load_config(["--config", str(recipe)])
    assert (config.model.loss, config.optim.ema_decay, config.optim.layer_decay, config.run.compile,
            config.model.patch_dropout) == ("siglip", 0.9, 0.8, False, 0.25)
    for flags, message in [(["--loss", "sigmoid"], "option loss is 'sigmoid': choose one of clip, siglip"),
                           (["--ema-decay", "1"], "option ema_decay is 1.0: it must be above 0 and below 1"),
                           (["--layer-decay", "0"], "option layer_decay is 0.0: it must be above 0 and at most 1")]:
        assert _train(tmp_path / "bad", 1, *flags) == 2
        assert message in capsys.readouterr().err


# what a run shows


def test_the_progress_bar_counts_steps_against_max_steps_and_no_flops_summary_is_printed(tmp_path, monkeypatch):
    monkeypatch.setattr("clipfromscratch.trainer.to_terminal", lambda: True)
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=1000, global_step=250, max_epochs=-1)
    assert bar._get_train_description(0) == "step 250/1000"  # Lightning's own reads "Epoch 0/-2" here
    bar._trainer = SimpleNamespace(max_steps=-1, global_step=250, max_epochs=5)
    assert bar._get_train_description(2).strip() == "Epoch 2/4"
    trainer = build_trainer(load_config(["--output-dir", str(tmp_path), "--precision", "32-true"]), str(tmp_path))
    assert any(isinstance(c, StepProgressBar) for c in trainer.callbacks)
    assert not any(isinstance(c, ModelSummary) for c in trainer.callbacks)  # its FLOPs would read 0
