"""GAN losses for a multi-scale discriminator, chosen by name (`train-gan --loss`).

- `wgan-gp`: the paper's loss: Wasserstein critic, gradient penalty and ProGAN's drift term.
  The penalty takes ONE gradient norm per sample over all scales (`gradient_penalty`), which
  is not what the official MSG-GAN code (akanimax/BMSG-GAN) writes: a mean over scales of each
  scale's own penalty.
- `logistic-r1`: StyleGAN2's non-saturating logistic loss with the R1 penalty on reals, lazily
  every `r1_interval` steps (weighted by the interval). It needs no interpolated pyramid and no
  second D pass on 15 of 16 steps, so a step costs less, and on small data it learns texture
  sooner (measured: README, "Training").

The caller owns the two pieces of work these functions must not do:
- D step: make `fake_scales` with the generator under `torch.no_grad()` (D's loss never
  reaches G, so recording G's graph only costs time and memory);
- G step: call `requires_grad(D, False)` first, so D's backward yields only the gradients
  with respect to its inputs and not its own weight gradients, which the G step throws away.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Scales = Sequence[Tensor]
ScoreFn = Callable[[list[Tensor]], Tensor]


def requires_grad(module: nn.Module, flag: bool) -> None:
    """Switch gradient recording for all of a module's parameters (freeze D for the G step)."""
    for param in module.parameters():
        param.requires_grad_(flag)


def wide(x: Tensor) -> Tensor:
    """x in at least fp32: half precision (autocast's bf16/fp16) is widened, float64 kept."""
    return x if x.dtype == torch.float64 else x.float()


def interpolate_scales(real_scales: Scales, fake_scales: Scales, alpha: Tensor) -> list[Tensor]:
    """real + alpha * (fake - real) at every scale, in at least fp32, as leaves that record grads.

    `alpha` has shape (N,): one factor per sample, shared by all scales, so that the pyramid
    being scored is a single point on the line between a real pyramid and a fake one.
    """
    mixed = []
    for real, fake in zip(real_scales, fake_scales, strict=True):
        a = alpha.reshape(-1, *([1] * (real.dim() - 1)))
        point = torch.lerp(wide(real.detach()), wide(fake.detach()), a)
        mixed.append(point.requires_grad_(True))
    return mixed


def gradient_penalty(
    D: ScoreFn,
    real_scales: Scales,
    fake_scales: Scales,
    weight: float = 10.0,
    alpha: Tensor | None = None,
    full_precision: bool = True,
) -> tuple[Tensor, Tensor]:
    """weight * mean_i (||g_i|| - 1)^2, one norm per sample over ALL scales:

        x_i,s = real_i,s + alpha_i (fake_i,s - real_i,s)    one alpha_i for all scales s
        g_i,s = d sum_j D(x_j) / d x_i,s                     the gradient at each scale
        ||g_i|| = sqrt(sum_s ||g_i,s||^2)                    the scales' gradients as one vector

    The discriminator is a function of the whole pyramid, so this is WGAN-GP's penalty on
    that one input. It is NOT the per-scale average of the official MSG-GAN code,
    (weight / S) sum_s mean_i (||g_i,s|| - 1)^2, which asks each scale's gradient alone to
    have norm 1 (for S scales, ||g_i|| near sqrt(S) there); there is no option for that one.
    Interpolation and gradients in fp32; `alpha` (N,) is drawn uniformly when not given.
    Returns (penalty, the per-sample norms ||g_i||).

    With `full_precision` (the default) autocast is switched off here: the D forward and the
    autograd.grad of the penalty run in fp32 even inside a bf16 autocast region. (||g|| - 1)^2
    is a small difference of numbers near 1, which bf16's 8-bit mantissa cannot resolve; the
    test in tests/test_losses.py measures the error both ways.
    """
    n = real_scales[0].shape[0]
    device = real_scales[0].device
    if alpha is None:
        alpha = torch.rand(n, device=device)
    precision = torch.autocast(device.type, enabled=False) if full_precision else nullcontext()
    with precision:
        mixed = interpolate_scales(real_scales, fake_scales, alpha)
        scores = D(mixed)
        grads = torch.autograd.grad(wide(scores).sum(), mixed, create_graph=True)
        flat = torch.cat([wide(g).flatten(1) for g in grads], dim=1)
        norms = torch.linalg.vector_norm(flat, dim=1)
        penalty = weight * (norms - 1.0).square().mean()
    return penalty, norms


def discriminator_loss(
    D: ScoreFn,
    real_scales: Scales,
    fake_scales: Scales,
    gp_weight: float = 10.0,
    drift: float = 0.001,
    alpha: Tensor | None = None,
    with_penalty: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """mean D(fake) - mean D(real) + gradient penalty + drift * mean D(real)^2.

    `fake_scales` must come from the generator run under `torch.no_grad()` (or be detached):
    the D step updates only D. The drift term (ProGAN) keeps real scores near zero so the
    Wasserstein estimate cannot wander off. `with_penalty=False` leaves the penalty out (the
    steps between two penalty steps of a lazy schedule).
    """
    real_scores = wide(D(list(real_scales)))
    fake_scores = wide(D(list(fake_scales)))
    wasserstein = real_scores.mean() - fake_scores.mean()
    drift_term = drift * real_scores.square().mean()
    loss = -wasserstein + drift_term
    names = ["d_loss", "d_real", "d_fake", "wasserstein"]
    parts = [real_scores.mean(), fake_scores.mean(), wasserstein]
    if with_penalty:
        penalty, norms = gradient_penalty(D, real_scales, fake_scales, gp_weight, alpha=alpha)
        loss = loss + penalty
        names += ["gp", "grad_norm"]
        parts += [penalty, norms.mean()]
    stats = dict(zip(names, torch.stack([loss, *parts]).detach().tolist(), strict=True))
    stats["real_sign"] = float(real_scores.detach().sign().mean())  # ADA's r_t
    return loss, stats


def generator_loss(D: ScoreFn, fake_scales: Scales) -> tuple[Tensor, dict[str, float]]:
    """-mean D(fake). Call `requires_grad(D, False)` before it, so D's weights get no grads."""
    loss = -wide(D(list(fake_scales))).mean()
    return loss, {"g_loss": loss.item()}


# --- non-saturating logistic loss with lazy R1 (StyleGAN2) -----------------------------------


def r1_penalty(D: ScoreFn, real_scales: Scales) -> tuple[Tensor, Tensor]:
    """(||grad_x D(x)||^2 per sample over all scales, D(x)) on real pyramids, in fp32."""
    device = real_scales[0].device
    with torch.autocast(device.type, enabled=False):
        leaves = [wide(x.detach()).requires_grad_(True) for x in real_scales]
        scores = wide(D(leaves))
        grads = torch.autograd.grad(scores.sum(), leaves, create_graph=True)
        squared = sum(g.square().flatten(1).sum(1) for g in grads)
    return squared, scores


def logistic_discriminator_loss(
    D: ScoreFn, real_scales: Scales, fake_scales: Scales, r1_gamma: float, r1_now: float
) -> tuple[Tensor, dict[str, float]]:
    """softplus(D(fake)) + softplus(-D(real)) [+ r1_now * gamma / 2 * ||grad D(real)||^2].

    `r1_now` is 0 on steps without the penalty and the lazy interval on steps with it, so the
    penalty's average weight is gamma / 2 (StyleGAN2's lazy regularisation).
    """
    fake_scores = wide(D(list(fake_scales)))
    if r1_now:
        squared, real_scores = r1_penalty(D, real_scales)
        penalty = r1_now * (r1_gamma / 2) * squared.mean()
    else:
        real_scores = wide(D(list(real_scales)))
        squared = penalty = torch.zeros((), device=real_scores.device)
    loss = F.softplus(fake_scores).mean() + F.softplus(-real_scores).mean() + penalty
    parts = torch.stack(
        [loss, real_scores.mean(), fake_scores.mean(), penalty, squared.mean()]
    ).detach()
    names = ("d_loss", "d_real", "d_fake", "r1", "r1_grad_sq")
    stats = dict(zip(names, parts.tolist(), strict=True))
    if not r1_now:  # only measured on penalty steps: no zeros in the logged averages
        del stats["r1"], stats["r1_grad_sq"]
    stats["real_sign"] = float(real_scores.detach().sign().mean())
    return loss, stats


def logistic_generator_loss(D: ScoreFn, fake_scales: Scales) -> tuple[Tensor, dict[str, float]]:
    """softplus(-D(fake)): the non-saturating generator loss."""
    loss = F.softplus(-wide(D(list(fake_scales)))).mean()
    return loss, {"g_loss": loss.item()}


# --- AC-GAN's class term, beside either loss ---------------------------------------------------

# The WGAN-GP paper's conditional CIFAR-10 model (AC-WGAN-GP, Gulrajani et al. 2017, its code's
# ACGAN_SCALE and ACGAN_SCALE_G) weights the generator's class term a tenth of the critic's.
G_CLASS_SHARE = 0.1


class ClassTerm:
    """AC-GAN's auxiliary classification loss (Odena et al. 2017) for a D with class logits:
    cross-entropy of D's logits on real images with their labels (D step, weight `weight`)
    and on fakes with the labels they were drawn for (G step, weight `weight` *
    G_CLASS_SHARE), so that each generated class must carry what tells the real classes apart.

    The losses above call D through a ScoreFn that returns scores only. The training loop's
    ScoreFn hands each pyramid's logits to `keep`, under the pyramid's first tensor's storage
    (a penalty's detached copy of the reals shares it; interpolated pyramids do not and are
    never looked up), and `loss` finds them again: the class term needs no D pass of its own.
    """

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self._logits: dict[int, Tensor] = {}

    def keep(self, scales: Scales, logits: Tensor) -> None:
        self._logits[scales[0].data_ptr()] = logits

    def loss(
        self, scales: Scales, labels: Tensor, share: float = 1.0
    ) -> tuple[Tensor, dict[str, float]]:
        """The weighted cross-entropy of the logits D gave `scales`, and its stats (the
        unweighted cross-entropy and D's accuracy on them); forgets every kept logit."""
        key = scales[0].data_ptr()
        if key not in self._logits:
            raise RuntimeError("ClassTerm.loss: D did not score this pyramid with logits")
        logits = wide(self._logits[key])
        self._logits.clear()
        cross_entropy = F.cross_entropy(logits, labels.long())
        accuracy = (logits.argmax(1) == labels).float().mean()
        return self.weight * share * cross_entropy, {
            "ce": cross_entropy.item(),
            "accuracy": accuracy.item(),
        }


# --- the registry the training loop uses ----------------------------------------------------


@dataclass(frozen=True)
class LossSettings:
    gp_weight: float = 10.0
    drift: float = 0.001
    gp_interval: int = 1  # lazy gradient penalty: every N steps, weighted by N
    r1_gamma: float = 0.1
    r1_interval: int = 16


def d_loss(
    name: str,
    D: ScoreFn,
    real_scales: Scales,
    fake_scales: Scales,
    settings: LossSettings,
    step: int,
    alpha: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The D step's loss of loss `name` at training step `step` (lazy terms depend on it).

    Lazy penalties (StyleGAN2's lazy regularisation): the penalty every `interval` steps,
    weighted by the interval, so its average weight is unchanged. The gradient penalty's
    double backward was 73% of a D step of the small budget (bench/gan_budget_step.py)."""
    if name == "wgan-gp":
        interval = settings.gp_interval
        return discriminator_loss(
            D, real_scales, fake_scales, settings.gp_weight * interval, settings.drift,
            alpha=alpha, with_penalty=step % interval == 0,
        )  # fmt: skip
    r1_now = settings.r1_interval if step % settings.r1_interval == 0 else 0
    return logistic_discriminator_loss(D, real_scales, fake_scales, settings.r1_gamma, r1_now)


def g_loss(name: str, D: ScoreFn, fake_scales: Scales) -> tuple[Tensor, dict[str, float]]:
    if name == "wgan-gp":
        return generator_loss(D, fake_scales)
    return logistic_generator_loss(D, fake_scales)


LOSSES = ("wgan-gp", "logistic-r1")
