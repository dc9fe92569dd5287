"""SinGAN (Shaham, Dekel & Michaeli, ICCV 2019): a GAN learnt from one image.

A pyramid of small fully convolutional generators G_0 (coarsest) .. G_N (finest), each with a
patch discriminator of the same shape. Scale n sees the image downsampled to size_n; G_n maps
noise * amp_n + up(x_{n-1}) to x_n = up(x_{n-1}) + G_n(...), so each scale adds the detail the
coarser ones could not draw. The reconstruction path feeds a fixed noise map z_rec at the
coarsest scale and zeros at the finer ones, and must give the image back.

The pyramid follows the official code: the image is first shrunk so its longer side is at most
`max_size`; the number of scales is ceil(log(min_size / shorter side) / log(scale_factor_init))
+ 1, and the factor is then made exact, (min_size / shorter side) ** (1 / (scales - 1)), so the
coarsest scale's shorter side is `min_size`. Channels double every 4 scales from `nfc` up to
`max_nfc`; every block is conv 3x3 - norm - LeakyReLU(0.2), the convs unpadded and the input
padded once by the receptive field (layers * 1 px), as the paper does.

Normalisation: the official code uses BatchNorm at a batch of one image, which is instance
normalisation with a learnt affine. InstanceNorm2d(affine=True) computes exactly that, and keeps
every sample of a generated batch independent of the others (BatchNorm would mix their
statistics), so a shard's bytes do not depend on how it is batched.

Pure nn.Modules and their config: no files, no training loop (synthbreast/train/singan.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def plan_scales(
    height: int, width: int, min_size: int, max_size: int, scale_factor_init: float
) -> tuple[list[list[int]], float]:
    """([h, w] of every scale, coarsest first; the exact scale factor) for an image."""
    if min(height, width) < 1:
        raise ValueError(f"image of {height}x{width} pixels")
    shrink = min(max_size / max(height, width), 1.0)
    finest = [max(1, round(height * shrink)), max(1, round(width * shrink))]
    shorter = min(finest)
    if shorter <= min_size:
        return [finest], 1.0
    steps = math.ceil(math.log(min_size / shorter) / math.log(scale_factor_init))
    factor = (min_size / shorter) ** (1 / steps)
    sizes = []
    for n in range(steps + 1):
        k = factor ** (steps - n)
        sizes.append([max(1, round(finest[0] * k)), max(1, round(finest[1] * k))])
    return sizes, factor


@dataclass
class SinGANConfig:
    channels: int = 3  # 1 grey (mammograms) | 3 RGB (histology)
    sizes: list[list[int]] = field(default_factory=list)  # [h, w] per scale, coarsest first
    scale_factor: float = 0.75  # the exact factor plan_scales found (for the record)
    nfc: int = 32  # channels of scale 0's blocks (the paper: 32)
    max_nfc: int = 128  # channels double every 4 scales up to this
    layers: int = 5  # conv blocks per generator and discriminator (the paper: 5)
    latent_dim: int = 0  # no latent vector: the noise maps are the input (registry field)
    num_classes: int = 0  # one image, one model: unconditional (registry field)

    @classmethod
    def for_image(
        cls,
        height: int,
        width: int,
        channels: int,
        min_size: int = 25,
        max_size: int = 250,
        scale_factor_init: float = 0.75,
        **kwargs: Any,
    ) -> SinGANConfig:
        sizes, factor = plan_scales(height, width, min_size, max_size, scale_factor_init)
        return cls(channels=channels, sizes=sizes, scale_factor=factor, **kwargs)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels {self.channels}: 1 (grey) or 3 (RGB)")
        if not self.sizes:
            raise ValueError("no scales: build the config with SinGANConfig.for_image")
        self.sizes = [[int(h), int(w)] for h, w in self.sizes]
        if self.layers < 2:
            raise ValueError(f"layers {self.layers}: at least 2 (a first and a last conv)")
        for h, w in self.sizes:
            # the discriminator's unpadded convs take `layers` px off every side
            if min(h, w) <= 2 * self.layers:
                raise ValueError(
                    f"a scale of {h}x{w} px is too small for {self.layers} layers: raise the "
                    f"minimum side above {2 * self.layers}"
                )

    @property
    def num_scales(self) -> int:
        return len(self.sizes)

    @property
    def resolution(self) -> int:
        """The finest scale's longer side (what the registry calls a model's resolution)."""
        return max(self.sizes[-1])

    def scale_channels(self, scale: int) -> int:
        return min(self.nfc * 2 ** (scale // 4), self.max_nfc)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SinGANConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SinGAN config keys: {', '.join(unknown)}")
        return cls(**data)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=0),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _body(channels: int, width: int, layers: int) -> nn.Sequential:
    blocks = [_block(channels, width)]
    blocks += [_block(width, width) for _ in range(layers - 2)]
    return nn.Sequential(*blocks)


def init_weights(module: nn.Module) -> None:
    """The official initialisation: conv N(0, 0.02), norm scale N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.InstanceNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class ScaleGenerator(nn.Module):
    """One scale: x = prev + tanh(tail(body(pad(noise + prev)))), unpadded convs."""

    def __init__(self, channels: int, width: int, layers: int):
        super().__init__()
        self.pad = layers  # each unpadded 3x3 conv takes 1 px off every side
        self.body = _body(channels, width, layers)
        self.tail = nn.Sequential(nn.Conv2d(width, channels, 3, padding=0), nn.Tanh())
        init_weights(self)

    def forward(self, noise: Tensor, prev: Tensor) -> Tensor:
        x = F.pad(noise + prev, [self.pad] * 4)
        return self.tail(self.body(x)) + prev


class PatchDiscriminator(nn.Module):
    """One scale's critic: a map of scores, one per receptive-field patch (11x11 at 5 layers).
    `score` averages it per image (what WGAN-GP compares)."""

    def __init__(self, channels: int, width: int, layers: int):
        super().__init__()
        self.body = _body(channels, width, layers)
        self.tail = nn.Conv2d(width, 1, 3, padding=0)
        init_weights(self)

    def forward(self, images: Tensor) -> Tensor:
        return self.tail(self.body(images))

    def score(self, images: Tensor) -> Tensor:
        return self.forward(images).mean(dim=(1, 2, 3))


def upsample(images: Tensor, size: list[int]) -> Tensor:
    """A coarser scale's images at the next scale's size (bicubic, as the official imresize)."""
    if list(images.shape[-2:]) == list(size):
        return images
    return F.interpolate(images, size=tuple(size), mode="bicubic", align_corners=False)


def image_pyramid(image: Tensor, sizes: list[list[int]]) -> list[Tensor]:
    """(1, C, H, W) in [-1, 1] -> the image at every scale's size, coarsest first; antialiased
    downsampling from the full image each time (no error that compounds scale to scale)."""
    out = []
    for size in sizes:
        if list(image.shape[-2:]) == list(size):
            out.append(image)
        else:
            scaled = F.interpolate(
                image, size=tuple(size), mode="bicubic", align_corners=False, antialias=True
            )
            out.append(scaled.clamp(-1, 1))
    return out


class SinGAN(nn.Module):
    """The generator pyramid with what sampling needs besides weights: the noise amplitude of
    every scale and the fixed reconstruction noise z_rec (buffers, saved with the weights).

    `sample(n, generator=...)`: n random variants from scale 0 (new layouts).
    `sample(n, inject_scale=k)`: scales < k follow the reconstruction path (the source image's
    layout), random noise from scale k on (same layout, new texture at finer detail).
    """

    def __init__(self, config: SinGANConfig):
        super().__init__()
        self.config = config
        self.generators = nn.ModuleList(
            ScaleGenerator(config.channels, config.scale_channels(n), config.layers)
            for n in range(config.num_scales)
        )
        self.register_buffer("noise_amp", torch.ones(config.num_scales))
        h, w = config.sizes[0]
        self.register_buffer("z_rec", torch.zeros(1, config.channels, h, w))

    def noise_shape(self, scale: int, n: int) -> tuple[int, int, int, int]:
        h, w = self.config.sizes[scale]
        return (n, self.config.channels, h, w)

    def scale_forward(self, scale: int, noise: Tensor, prev: Tensor) -> Tensor:
        """x_scale from its noise map (unscaled) and the coarser scale's output (upsampled)."""
        return self.generators[scale](noise * self.noise_amp[scale], prev)

    def reconstruct(self, upto: int | None = None) -> list[Tensor]:
        """The reconstruction path's output at every scale up to `upto` (default all)."""
        last = self.config.num_scales - 1 if upto is None else upto
        outs: list[Tensor] = []
        prev = torch.zeros_like(self.z_rec)
        for n in range(last + 1):
            prev = upsample(prev, self.config.sizes[n]) if n else prev
            noise = self.z_rec if n == 0 else torch.zeros_like(prev)
            prev = self.scale_forward(n, noise, prev)
            outs.append(prev)
        return outs

    def random_upto(
        self, n_images: int, upto: int, generator: torch.Generator | None = None,
        inject_scale: int = 0,
    ) -> Tensor:  # fmt: skip
        """Samples at scale `upto`: reconstruction path below `inject_scale`, noise (drawn on
        the CPU from `generator`, so any device gives the same noise) from it on."""
        device = self.z_rec.device
        prev = torch.zeros(self.noise_shape(0, n_images), device=device)
        for n in range(upto + 1):
            prev = upsample(prev, self.config.sizes[n]) if n else prev
            if n < inject_scale:
                noise = self.z_rec.expand_as(prev) if n == 0 else torch.zeros_like(prev)
            else:
                noise = torch.randn(self.noise_shape(n, n_images), generator=generator)
                noise = noise.to(device)
            prev = self.scale_forward(n, noise, prev)
        return prev

    def sample(
        self, n_images: int, generator: torch.Generator | None = None, inject_scale: int = 0
    ) -> Tensor:
        """(n, C, H, W) in about [-1, 1] at the finest scale."""
        if not 0 <= inject_scale < self.config.num_scales:
            raise ValueError(f"inject_scale {inject_scale}: 0..{self.config.num_scales - 1}")
        return self.random_upto(n_images, self.config.num_scales - 1, generator, inject_scale)


def build_generator(config: SinGANConfig) -> SinGAN:
    return SinGAN(config)


def build_discriminators(config: SinGANConfig) -> nn.ModuleList:
    return nn.ModuleList(
        PatchDiscriminator(config.channels, config.scale_channels(n), config.layers)
        for n in range(config.num_scales)
    )


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
