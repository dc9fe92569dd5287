"""WGAN-GP for a multi-scale discriminator, and the generator's EMA copy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from synthbreast.models.msggan import Discriminator, Generator, MSGGANConfig, image_pyramid
from synthbreast.train.ema import make_ema, update_ema
from synthbreast.train.losses import (
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    requires_grad,
)

SCALES = [4, 8, 16]

# Measured: the fp32 penalty path inside bf16 autocast matches plain fp32 to ~1e-7 (the same
# fp32 ops run); letting bf16 into the penalty gave relative errors of ~1e-2 and more.
GP_FP32_PATH_RTOL = 1e-5


class LinearD(nn.Module):
    """D(x) = sum over scales of <w_s, x_s> + b: its input gradient is w for every sample, so
    the gradient norm is known exactly: sqrt(sum_s ||w_s||^2)."""

    def __init__(self, per_scale_value: list[float]) -> None:
        super().__init__()
        self.weights = nn.ParameterList(
            nn.Parameter(torch.full((3, s, s), v))
            for s, v in zip(SCALES, per_scale_value, strict=True)
        )
        self.bias = nn.Parameter(torch.tensor(0.5))

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return (
            sum((x * w).flatten(1).sum(1) for x, w in zip(images, self.weights, strict=True))
            + self.bias
        )

    def grad_norm(self) -> float:
        return math.sqrt(sum(float(w.detach().square().sum()) for w in self.weights))


class RecordingD(nn.Module):
    """Remembers the inputs it was given; its score is a plain sum so gradients exist."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        self.seen = [x.detach().clone() for x in images]
        return sum(x.flatten(1).sum(1) for x in images)


def pyramids(n: int = 4, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    real = image_pyramid(torch.randn(n, 3, SCALES[-1], SCALES[-1], generator=g), SCALES)
    fake = image_pyramid(torch.randn(n, 3, SCALES[-1], SCALES[-1], generator=g), SCALES)
    return real, fake


@pytest.mark.parametrize("values", [[0.01, 0.02, 0.005], [0.2, 0.0, 0.1], [0.0, 0.0, 0.0]])
def test_penalty_exact_for_linear_d(values):
    D = LinearD(values)
    real, fake = pyramids()
    penalty, norms = gradient_penalty(D, real, fake)
    norm = D.grad_norm()  # one norm over all scales, not a sum of per-scale norms
    torch.testing.assert_close(norms, torch.full((4,), norm), rtol=1e-5, atol=1e-6)
    assert penalty.item() == pytest.approx(10.0 * (norm - 1.0) ** 2, rel=1e-5)
    penalty5, _ = gradient_penalty(D, real, fake, weight=5.0)
    assert penalty5.item() == pytest.approx(5.0 * (norm - 1.0) ** 2, rel=1e-5)


def test_penalty_trains_d_weights():
    """create_graph=True: the penalty's gradient reaches D's weights (d/dw 10(|w|-1)^2)."""
    D = LinearD([0.01, 0.02, 0.005])
    real, fake = pyramids()
    penalty, _ = gradient_penalty(D, real, fake)
    penalty.backward()
    norm = D.grad_norm()
    for w in D.weights:
        expected = 10.0 * 2 * (norm - 1.0) * w.detach() / norm
        torch.testing.assert_close(w.grad, expected, rtol=1e-4, atol=1e-7)


def test_interpolation_factor_is_shared_across_scales():
    D = RecordingD()
    n = 8
    real = [torch.zeros(n, 3, s, s) for s in SCALES]
    fake = [torch.ones(n, 3, s, s) for s in SCALES]
    torch.manual_seed(0)
    gradient_penalty(D, real, fake)
    alpha = D.seen[0][:, 0, 0, 0]  # with real 0 and fake 1, the mix *is* alpha
    for mixed in D.seen:
        torch.testing.assert_close(mixed, alpha.reshape(n, 1, 1, 1).expand_as(mixed))
    assert alpha.unique().numel() == n  # one factor per sample, not one per batch

    given = torch.linspace(0, 1, n)
    gradient_penalty(D, real, fake, alpha=given)
    torch.testing.assert_close(D.seen[-1][:, 0, 0, 0], given)


def tiny_gan_inputs(seed: int = 0):
    torch.manual_seed(seed)
    config = MSGGANConfig(resolution=32, latent_dim=32, width=1 / 16)
    G, D = Generator(config), Discriminator(config)
    real = image_pyramid(torch.rand(8, 3, 32, 32) * 2 - 1, config.scales())
    with torch.no_grad():
        fake = G(torch.randn(8, 32))
    return D, real, fake


def test_penalty_under_bf16_autocast_equals_fp32():
    D, real, fake = tiny_gan_inputs()
    alpha = torch.rand(8)
    ref, ref_norms = gradient_penalty(D, real, fake, alpha=alpha)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf, bf_norms = gradient_penalty(D, real, fake, alpha=alpha)
        # fakes made by G under autocast arrive as bf16; the penalty still runs in fp32
        bf_in, _ = gradient_penalty(D, real, [x.bfloat16() for x in fake], alpha=alpha)
        loose, _ = gradient_penalty(D, real, fake, alpha=alpha, full_precision=False)
    assert bf.dtype == torch.float32
    assert bf.item() == pytest.approx(ref.item(), rel=GP_FP32_PATH_RTOL)
    torch.testing.assert_close(bf_norms, ref_norms, rtol=GP_FP32_PATH_RTOL, atol=0)
    fake_rounding = [x.bfloat16().float() for x in fake]
    ref_rounded, _ = gradient_penalty(D, real, fake_rounding, alpha=alpha)
    assert bf_in.item() == pytest.approx(ref_rounded.item(), rel=GP_FP32_PATH_RTOL)
    # bf16 inside the penalty is measurably off: the reason the fp32 path is the default
    assert loose.item() != pytest.approx(ref.item(), rel=GP_FP32_PATH_RTOL)


def test_discriminator_loss_terms():
    D = LinearD([0.01, 0.02, 0.005])
    real, fake = pyramids()
    alpha = torch.rand(4)
    loss, stats = discriminator_loss(D, real, fake, gp_weight=10.0, drift=0.001, alpha=alpha)
    with torch.no_grad():
        d_real, d_fake = D(real), D(fake)
    norm = D.grad_norm()
    expected = (
        d_fake.mean() - d_real.mean() + 10.0 * (norm - 1) ** 2 + 0.001 * d_real.square().mean()
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["d_loss"] == pytest.approx(loss.item())
    assert stats["wasserstein"] == pytest.approx((d_real.mean() - d_fake.mean()).item(), rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert set(stats) == {
        "d_loss",
        "d_real",
        "d_fake",
        "wasserstein",
        "gp",
        "grad_norm",
        "real_sign",
    }


def test_generator_loss_is_minus_mean_score():
    D = LinearD([0.01, 0.02, 0.005])
    _, fake = pyramids()
    loss, stats = generator_loss(D, fake)
    assert loss.item() == pytest.approx(-D(fake).mean().item(), rel=1e-6)
    assert stats == {"g_loss": pytest.approx(loss.item())}


def test_requires_grad_toggles_every_parameter():
    D = LinearD([0.1, 0.1, 0.1])
    requires_grad(D, False)
    assert not any(p.requires_grad for p in D.parameters())
    requires_grad(D, True)
    assert all(p.requires_grad for p in D.parameters())


def test_ema_moves_toward_model_by_one_minus_decay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = make_ema(model)
    assert not any(p.requires_grad for p in ema.parameters())
    assert not ema.training
    start = [p.detach().clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 4))  # changes BatchNorm's running statistics (buffers)
    update_ema(ema, model, decay=0.9)
    for e, s, m in zip(ema.parameters(), start, model.parameters(), strict=True):
        torch.testing.assert_close(e, s + 0.1 * (m.detach() - s))
    for e, m in zip(ema.buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(e, m)
    update_ema(ema, model, decay=0.0)  # decay 0 copies the model
    for e, m in zip(ema.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(e, m.detach())
