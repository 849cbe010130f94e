import math

import torch
import torch.nn.functional as F

from clipfromscratch.loss import clip_logits, clip_loss, siglip_loss


def _worked_example_features():
    """Unit vectors with sim(I1,T1)=0.746, sim(I1,T2)=-0.232, sim(I2,T2)=0.710, sim(I2,T1)=-0.250: the worked
    example of Benedetto's thesis on CLIP."""
    images = torch.eye(4)[:2]
    t1 = torch.tensor([0.746, -0.250, math.sqrt(1 - 0.746**2 - 0.250**2), 0.0])
    t2 = torch.tensor([-0.232, 0.710, 0.0, math.sqrt(1 - 0.232**2 - 0.710**2)])
    return images.double(), torch.stack([t1, t2]).double()


def test_worked_example_of_the_thesis():
    images, texts = _worked_example_features()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    logits = clip_logits(images, texts, scale)
    torch.testing.assert_close(logits * 0.07, torch.tensor([[0.746, -0.232], [-0.250, 0.710]], dtype=torch.float64))
    per_image = F.cross_entropy(logits, torch.arange(2), reduction="none")
    # the thesis works these out by hand as L1 ~ 8.4e-7 and L2 ~ 1.1e-6 (rounded intermediate exponentials)
    assert math.isclose(per_image[0].item(), 8.4e-7, rel_tol=0.05)
    assert math.isclose(per_image[1].item(), 1.1e-6, rel_tol=0.05)
    # exact: -log softmax of the diagonal = log(1 + exp(off - diag)), in both directions
    expected = [math.log1p(math.exp((off - diag) / 0.07)) for diag, off in
                [(0.746, -0.232), (0.710, -0.250), (0.746, -0.250), (0.710, -0.232)]]
    assert math.isclose(clip_loss(images, texts, scale).item(), sum(expected) / 4, rel_tol=1e-6)


def test_matches_a_direct_computation():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(3.0, dtype=torch.float64)
    total = 0.0
    for i in range(6):
        row = [scale.item() * float(images[i] @ texts[j]) for j in range(6)]
        col = [scale.item() * float(images[j] @ texts[i]) for j in range(6)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    assert math.isclose(clip_loss(images, texts, scale).item(), total / 12, rel_tol=1e-12)


def test_loss_is_symmetric_and_trains_the_scale():
    torch.manual_seed(1)
    images = F.normalize(torch.randn(5, 4), dim=-1)
    texts = F.normalize(torch.randn(5, 4), dim=-1)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = clip_loss(images, texts, log_scale.exp())
    torch.testing.assert_close(loss, clip_loss(texts, images, log_scale.exp()))
    loss.backward()
    assert log_scale.grad is not None and log_scale.grad.abs() > 0


def _features(seed: int, rows: int = 6, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    images = F.normalize(torch.randn(rows, dim, dtype=torch.float64), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(rows, dim, dtype=torch.float64), dim=-1).requires_grad_()
    return images, texts


def test_siglip_loss_is_the_sum_over_pairs_of_binary_losses_per_image():
    images, texts = _features(2)
    scale, bias = 7.0, -3.0
    total = 0.0
    for i in range(6):
        for j in range(6):
            z = scale * float(images[i] @ texts[j]) + bias
            total += math.log1p(math.exp(-z if i == j else z))  # -log sigmoid(+z) on the diagonal, of -z elsewhere
    value = siglip_loss(images, texts, *torch.tensor([scale, bias], dtype=torch.float64))
    assert math.isclose(value.item(), total / 6, rel_tol=1e-12)


def test_siglip_loss_gives_the_value_and_gradients_of_open_clip():
    from open_clip.loss import SigLipLoss

    results = []
    for loss_fn in (siglip_loss, SigLipLoss()):
        images, texts = _features(3)
        log_scale = torch.tensor(math.log(10), dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
        loss = loss_fn(images, texts, log_scale.exp(), bias)
        loss.backward()
        results.append((loss.detach(), images.grad, texts.grad, log_scale.grad, bias.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    assert results[0][4].abs() > 0  # the bias is trained
