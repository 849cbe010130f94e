"""Mixed precision with the fused AdamW: the true gradient is clipped under fp16's loss scaling and under bf16, and
`--precision auto` picks what the device runs well."""
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from clipfromscratch.config import ModelConfig, OptimConfig
from clipfromscratch.lit_module import CLIPModule
from clipfromscratch.model import build_model
from clipfromscratch.text_tokenizers import make_tokenizer, tokenize
from clipfromscratch.trainer import resolve_precision

CAPTIONS = ["a small red circle on the left", "a blue square above a green triangle", "one large yellow star",
            "there is an orange cross in the middle", "a purple diamond", "two pink circles",
            "a cyan star below a red square", "a tiny white triangle"]
CLIP_AT = 0.01  # far below the gradient norm of a first step, so every step is clipped


class StepGradients(pl.Callback):
    """Records the norm of the gradient each optimizer step applies, undoing a loss scale the step would undo."""

    def __init__(self):
        self.norms: list[float] = []

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        step = optimizer.step

        def recorded_step(closure=None, **kwargs):
            # without a scaler, Lightning passes forward, backward and clipping as the closure
            loss = None if closure is None else closure()
            # GradScaler hands a fused optimizer the scale to divide by, or None where the gradients are unscaled
            scale = getattr(optimizer, "grad_scale", None)
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.norms.append(float(norm / (1 if scale is None else scale)))
            step(**kwargs)
            return loss

        optimizer.step = recorded_step


def _fit(precision_plugin: MixedPrecision) -> list[float]:
    torch.manual_seed(0)
    tokenizer = make_tokenizer("bert", False, "tiny", CAPTIONS * 4)
    model = build_model(ModelConfig(image_encoder="vit", text_encoder="bert", image_size=32, embed_dim=16), tokenizer)
    batches = [{"pixels": torch.randn(8, 3, 32, 32), **tokenize(tokenizer, CAPTIONS, 16)} for _ in range(3)]
    module = CLIPModule(model, OptimConfig(lr_schedule="constant", gradient_clip_val=CLIP_AT))
    recorder = StepGradients()
    trainer = pl.Trainer(accelerator="cpu", plugins=[precision_plugin], max_steps=3, gradient_clip_val=CLIP_AT,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 3
    return recorder.norms


@pytest.mark.parametrize("precision_plugin", [
    # fp16 autocast and a GradScaler run on CPU too; a small initial scale keeps the first steps finite
    lambda: MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256)),
    lambda: MixedPrecision("bf16-mixed", "cpu"),
], ids=["16-mixed", "bf16-mixed"])
def test_mixed_precision_clips_the_true_gradient_of_the_fused_adamw(precision_plugin):
    norms = _fit(precision_plugin())
    # clipped to CLIP_AT after unscaling: not refused, not clipped while still scaled (that would be CLIP_AT / 256)
    assert norms == pytest.approx([CLIP_AT] * 3, rel=1e-3)


def test_auto_precision_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "auto") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100, H100
    assert resolve_precision("auto", "auto") == "bf16-mixed" == resolve_precision("auto", "gpu")
    assert resolve_precision("auto", "cpu") == "32-true"
    # V100, T4: bf16 only emulated, far slower than fp16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", "cuda") == "16-mixed"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"  # an explicit choice stands
