"""Big contrastive batches on small memory: feature-cached accumulation, gradient checkpointing, locked towers."""
import pytest
import torch

from clipfromscratch.config import ModelConfig, OptimConfig
from clipfromscratch.lit_module import CLIPModule
from clipfromscratch.loss import clip_loss
from clipfromscratch.model import build_model
from clipfromscratch.text_tokenizers import make_tokenizer, tokenize

CAPTIONS = ["a small red circle on the left", "a blue square above a green triangle", "one large yellow star",
            "there is an orange cross in the middle", "a purple diamond", "two pink circles",
            "a cyan star below a red square", "a tiny white triangle"]


def _model(image_enc: str, text_enc: str):
    torch.manual_seed(0)
    tokenizer = make_tokenizer(text_enc, False, "tiny", CAPTIONS * 10)
    config = ModelConfig(image_encoder=image_enc, text_encoder=text_enc, image_size=32, embed_dim=16)
    # float64 and eval mode (no dropout, fixed norm statistics): runs differ only in summation order
    model = build_model(config, tokenizer).double().eval()
    batch = {"pixels": torch.randn(8, 3, 32, 32, dtype=torch.float64), **tokenize(tokenizer, CAPTIONS, 16)}
    return model, batch


def _grads(module: CLIPModule, batch: dict) -> dict[str, torch.Tensor]:
    module.zero_grad()
    images, texts = module.embed(batch)
    clip_loss(images, texts, module.model.logit_scale()).backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def _module(model, accum_freq: int = 1) -> CLIPModule:
    return CLIPModule(model, OptimConfig(lr=1e-3, lr_schedule="constant", accum_freq=accum_freq))


@pytest.mark.parametrize("image_enc, text_enc", [("vit", "bert"), ("resnet", "gpt2")])
@pytest.mark.parametrize("accum_freq", [2, 4])
def test_feature_cached_accumulation_gives_the_big_batch_gradient(image_enc, text_enc, accum_freq):
    model, batch = _model(image_enc, text_enc)
    big_batch = _grads(_module(model), batch)
    accumulated = _grads(_module(model, accum_freq), batch)
    assert accumulated.keys() == big_batch.keys() and len(big_batch) == len(list(model.parameters()))
    for name, grad in big_batch.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    # plain accumulation (each micro-batch its own negatives) would not: the test can tell them apart
    halves = [_grads(_module(model), {k: v[i:i + 4] for k, v in batch.items()}) for i in (0, 4)]
    assert not torch.allclose((halves[0]["log_logit_scale"] + halves[1]["log_logit_scale"]) / 2,
                              big_batch["log_logit_scale"], rtol=1e-3)


@pytest.mark.parametrize("image_enc, text_enc", [("vit", "bert"), ("resnet", "gpt2")])
def test_gradient_checkpointing_keeps_the_gradient(image_enc, text_enc):
    model, batch = _model(image_enc, text_enc)
    # transformers checkpoints in train mode only; the tiny presets have no dropout, so only checkpointing changes
    model.train()
    plain = _grads(_module(model), batch)
    model.image_tower.enable_grad_checkpointing()
    model.text_tower.enable_grad_checkpointing()
    assert model.image_tower.backbone.grad_checkpointing and model.text_tower.backbone.is_gradient_checkpointing
    checkpointed = _grads(_module(model), batch)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_locked_image_tower_gets_no_gradient_and_stays_in_eval_mode():
    model, batch = _model("resnet", "bert")
    model.lock_towers(image=True, text=False)
    model.train()
    assert not model.image_tower.training and model.text_tower.training and model.image_head.training
    running_mean = [m.running_mean.clone() for m in model.image_tower.modules() if hasattr(m, "running_mean")]
    grads = _grads(_module(model), batch)
    assert not any(name.startswith("image_tower.") for name in grads)
    assert any(name.startswith("image_head.") for name in grads) and any(n.startswith("text_tower.") for n in grads)
    after = [m.running_mean for m in model.image_tower.modules() if hasattr(m, "running_mean")]
    assert running_mean and all(torch.equal(a, b) for a, b in zip(running_mean, after))
