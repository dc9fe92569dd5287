"""Augmentation for GANs trained on little data.

Two kinds, for two reasons:

- **Dataset symmetries** (`dihedral`): flips and 90-degree rotations of the real images. A
  histology patch has no up or left, so each of the 8 is an equally real patch of the same
  label: 8x the data for free, and the generator learns them all (StyleGAN's --mirror, widened).
- **Discriminator augmentation** (`--augment diffaug|ada`): DiffAugment (Zhao et al. 2020) --
  colour (brightness, saturation, contrast), translation by up to 1/8 of the side, cutout of
  half the side -- applied to real AND fake images before D, differentiably, so D cannot
  memorise the few real images and G is not taught the augmentations (they are never leaked
  into G's output, because D sees both sides through the same distortion). `ada` applies each
  transform with probability p, adjusted during training by ADA's overfitting heuristic r_t =
  E[sign(D(real))] (Karras et al. 2020): p goes up when r_t is above the target.

The discriminator of MSG-GAN reads a pyramid of scales. One transform is drawn per sample and
applied identically at every scale: translations and cutouts are in units of the image side
(a shift of 1/8 is 8 px at 64 and 0.5 px at 4, by bilinear resampling), so the pyramid stays
the same picture at every scale and D cannot tell real from fake by their disagreement.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENTS = ("none", "diffaug", "ada")
TRANSLATION = 1 / 8  # DiffAugment's ratio: shift up to 1/8 of the side each way
CUTOUT = 1 / 2  # DiffAugment's ratio: a square of half the side set to zero
ADA_TARGET = 0.6  # StyleGAN2-ADA's r_t target
ADA_KIMG = 100  # images (in thousands) for p to go from 0 to 1 at the fastest (StyleGAN2-ADA: 500)


def dihedral(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each image under one of the 8 flips/rotations, drawn per sample."""
    n = images.shape[0]
    choice = torch.randint(0, 8, (n,), generator=generator).tolist()
    out = []
    for image, k in zip(images, choice, strict=True):
        if k & 4:
            image = image.flip(-1)
        out.append(torch.rot90(image, k & 3, dims=(-2, -1)))
    return torch.stack(out)


class Augment:
    """Draw per-sample parameters once, apply them to every scale of a pyramid.

    `p` is the probability of each transform (1.0 = DiffAugment; ADA adapts it). Parameters
    come from `generator` (CPU), so a run is reproducible and resumes exactly.
    """

    def __init__(self, n: int, p: float, generator: torch.Generator | None = None) -> None:
        def draw(*shape: int) -> Tensor:
            return torch.rand(n, *shape, generator=generator)

        def on() -> Tensor:  # which samples get the transform (one draw per transform)
            return (draw() < p).float()

        self.brightness = (draw() - 0.5) * on()  # +-0.5 on [-1, 1] images
        self.saturation = 1 + (draw() * 2 - 1) * on()  # x [0, 2]
        self.contrast = 1 + (draw() - 0.5) * on()  # x [0.5, 1.5]
        # translation in units of the side, and a cutout centre in [0, 1]
        self.shift = (draw(2) * 2 - 1) * TRANSLATION * on()[:, None]
        self.cut_centre = draw(2)
        self.cut_on = on()

    def colour(self, x: Tensor) -> Tensor:
        b = self.brightness.to(x)[:, None, None, None]
        s = self.saturation.to(x)[:, None, None, None]
        c = self.contrast.to(x)[:, None, None, None]
        x = x + b
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * s + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * c + mean

    def translate(self, x: Tensor, shift: Tensor) -> Tensor:
        n, _, h, w = x.shape
        theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        # grid coordinates span 2 per side; sampling at u - 2d moves the content by +d
        theta[:, :, 2] = -2 * shift.to(x)
        grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def cutout(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
        xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
        centre = self.cut_centre.to(x)
        inside_y = (ys[None, :] - centre[:, 1:2]).abs() < CUTOUT / 2
        inside_x = (xs[None, :] - centre[:, 0:1]).abs() < CUTOUT / 2
        cut = inside_y[:, :, None] & inside_x[:, None, :] & (self.cut_on.to(x)[:, None, None] > 0)
        return x * (~cut).to(x)[:, None]

    def __call__(self, scales: Sequence[Tensor]) -> list[Tensor]:
        # whole pixels of the top scale, so the top image moves exactly (lower ones resample)
        top = scales[-1].shape[-1]
        shift = torch.round(self.shift * top) / top
        return [self.cutout(self.translate(self.colour(x), shift)) for x in scales]


class AdaptiveP:
    """ADA's controller: every `interval` steps move p by sign(r_t - target) * speed.

    r_t = E[sign(D(real))]: near 0 when D cannot tell its training reals from fakes, near 1
    when it has memorised them (overfitting). `speed` makes p able to go 0 -> 1 in ADA_KIMG.
    """

    def __init__(self, batch_size: int, interval: int = 4, p: float = 0.0) -> None:
        self.p = p
        self.interval = interval
        self.speed = batch_size * interval / (ADA_KIMG * 1000)
        self.signs: list[float] = []

    def observe(self, real_scores: Tensor) -> None:
        self.signs.append(float(real_scores.detach().float().sign().mean()))
        if len(self.signs) >= self.interval:
            r_t = sum(self.signs) / len(self.signs)
            self.p = min(1.0, max(0.0, self.p + self.speed * (1 if r_t > ADA_TARGET else -1)))
            self.signs = []

    def state(self) -> dict[str, float | list[float]]:
        return {"p": self.p, "signs": list(self.signs)}

    def load(self, state: dict) -> None:
        self.p, self.signs = float(state["p"]), list(state["signs"])
