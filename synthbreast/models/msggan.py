"""MSG-GAN (Karnewar & Wang, CVPR 2020): a generator that emits an image at every scale and a
discriminator that reads all of them, so gradients reach every generator block at once.

Layout follows the synthbreast paper's Tables 1 and 2 (64x64x3, 5 blocks, 512 channels at
4..32 px and 256 at 64 px) with the official code's equalised learning rate, pixel norm and
LeakyReLU(0.2). Two deliberate changes keep every convolution's channel count a multiple of 16,
because oneDNN on the CPU runs misaligned widths much slower (see MSGGAN-NOTES.md):

- the image of each lower scale enters the discriminator through a 1x1 `from_rgb` with
  `rgb_channels` (16) outputs, concatenated with the features coming down (the paper's
  phi_simple concatenates the 3 raw channels, which would give 515-channel convolutions);
- minibatch standard deviation runs once, in the 4x4 block, and its single statistic channel
  takes one of the 16 slots of that block's `from_rgb` (15 + 1), so that block stays aligned.

With `num_classes` >= 2 the pair is conditional (`msggan-cond`), one model for every class:
- G: the one-hot label is embedded to `latent_dim` and joined to the latent, each
  pixel-normalised (as StyleGAN2-ADA's mapping network joins its embedding); with
  `g_condition="modulate"` every block also scales and shifts its features per class and
  channel (conditional normalisation, as BigGAN's class-conditional batch norm), so the label
  reaches the fine scales directly and not only through the 4x4 features;
- D: a projection discriminator (Miyato & Koyama 2018) at the 4x4 output: the score is
  `linear(h) + <embed(y), h> / sqrt(C)` on the final features h, so that D judges "is this a
  real image of class y" and not only "is this real".

Models here are pure: nn.Modules and their config, no files, no prints, no devices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LRELU_SLOPE = 0.2
RELU_GAIN = math.sqrt(2.0)  # He gain for layers followed by LeakyReLU
LINEAR_GAIN = 1.0  # to_rgb and the discriminator's score are linear (as in ProGAN)
G_NOISE = ("none", "all", "coarse")  # where the generator adds per-pixel noise
G_CONDITION = ("input", "modulate")  # where a conditional generator reads its label


@dataclass
class MSGGANConfig:
    """Everything that shapes a generator/discriminator pair; stored in checkpoints as JSON."""

    resolution: int = 64  # output side in pixels; a power of two >= 8
    latent_dim: int = 512
    fmap_base: int = 16384  # channels(res) = min(fmap_base // res, fmap_max) * width
    fmap_max: int = 512
    width: float = 1.0  # 1.0 = the paper; < 1 for narrow CPU models
    fmap_min: int = 16  # floor after scaling by width
    # the generator's own floor (0: fmap_min): a narrow G gets more channels at the fine
    # scales, where the width rule leaves it fewest, without widening D
    g_fmap_min: int = 0
    align: int = 16  # channel counts are rounded to a multiple of this (oneDNN speed)
    rgb_channels: int = 16  # from_rgb width of each lower scale in the discriminator
    mbstd_group: int = 4  # minibatch standard deviation group size
    # padding of the generator's 3x3 convs: "zeros" (ProGAN, the official MSG-GAN) or
    # "reflect", which gives G no image border to paint (narrow CPU models drew frames)
    g_padding: str = "zeros"
    # the generator's x2 upsampling: "nearest" (ProGAN, the official MSG-GAN) or "bilinear",
    # which does not hand the next conv blocky 2x2 copies to turn into grid artefacts
    g_upsample: str = "nearest"
    # per-pixel noise added after generator convs, scaled per channel by a learnt weight that
    # starts at 0 (StyleGAN): stochastic detail need not be drawn from the latent. "all": every
    # block; "coarse": every block but the top one, so the noise shapes structure at half the
    # output side and up but leaves no pixel-level speckle in the image; "none" (the paper)
    g_noise: str = "none"
    num_classes: int = 0  # 0: unconditional (msggan); >= 2: conditional (msggan-cond)
    # where a conditional G reads the label: "input" (embedding joined to the latent) or
    # "modulate" (that, and a per-class scale and bias of every block's features)
    g_condition: str = "input"
    # a conditional D's auxiliary classifier (AC-GAN, Odena et al. 2017): class logits from
    # the same 4x4 features the score reads, beside the projection; the training loss decides
    # whether it is used (train-gan --class-weight)
    d_classifier: bool = False
    # channels of the images G draws and D reads: 3 (RGB histology) or 1 (grey mammograms);
    # checkpoints written before the field have none and are RGB
    image_channels: int = 3

    def __post_init__(self) -> None:
        res = self.resolution
        if res < 8 or res & (res - 1):
            raise ValueError(f"resolution must be a power of two >= 8, got {res}")
        if self.g_fmap_min < 0 or self.g_fmap_min % self.align:
            raise ValueError(
                f"g_fmap_min must be 0 or a multiple of {self.align}, got {self.g_fmap_min}"
            )
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.g_padding not in ("zeros", "reflect", "replicate"):
            raise ValueError(f"g_padding must be zeros, reflect or replicate: {self.g_padding}")
        if self.g_upsample not in ("nearest", "bilinear"):
            raise ValueError(f"g_upsample must be nearest or bilinear: {self.g_upsample}")
        if self.g_noise not in G_NOISE:
            raise ValueError(f"g_noise must be one of {', '.join(G_NOISE)}: {self.g_noise}")
        if self.g_condition not in G_CONDITION:
            raise ValueError(
                f"g_condition must be one of {', '.join(G_CONDITION)}: {self.g_condition}"
            )
        if self.rgb_channels < 2:
            raise ValueError("rgb_channels must be >= 2 (the 4x4 block gives one to mbstd)")
        if self.num_classes == 1 or self.num_classes < 0:
            raise ValueError(f"num_classes must be 0 (unconditional) or >= 2: {self.num_classes}")
        if self.g_condition == "modulate" and self.num_classes == 0:
            raise ValueError("g_condition modulate needs a conditional model (msggan-cond)")
        if self.d_classifier and self.num_classes == 0:
            raise ValueError("d_classifier needs a conditional model (msggan-cond)")
        if self.image_channels not in (1, 3):
            raise ValueError(f"image_channels must be 1 or 3, got {self.image_channels}")

    @property
    def conditional(self) -> bool:
        return self.num_classes >= 2

    def channels(self, res: int) -> int:
        """Feature channels at side `res`: StyleGAN's rule, scaled by width, aligned, floored."""
        base = min(self.fmap_base // res, self.fmap_max) * self.width
        aligned = round(base / self.align) * self.align
        return max(aligned, self.fmap_min, self.align)

    def g_channels(self, res: int) -> int:
        """The generator's channels at side `res`: `channels`, floored at g_fmap_min."""
        return max(self.channels(res), self.g_fmap_min)

    def scales(self) -> list[int]:
        """Image sides from 4 to resolution, ascending: the order of G's outputs and D's input."""
        return [2**k for k in range(2, int(math.log2(self.resolution)) + 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MSGGANConfig:
        """Rebuild from `to_dict()` output; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MSGGANConfig keys: {sorted(unknown)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Equalised-learning-rate layers: weights drawn N(0, 1) and scaled by the He constant at every
# call, so that Adam/RMSprop see all layers at the same scale (ProGAN section 4.1).
# --------------------------------------------------------------------------------------------


class EqualizedConv2d(nn.Module):
    """Conv2d with runtime He scaling; 'same' padding for odd kernels, none for even ones."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        gain: float = RELU_GAIN,
        padding: int = -1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.scale = gain / math.sqrt(in_ch * kernel * kernel)
        self.padding = kernel // 2 if padding < 0 else padding
        self.padding_mode = padding_mode

    def forward(self, x: Tensor) -> Tensor:
        if self.padding and self.padding_mode != "zeros":
            x = F.pad(x, [self.padding] * 4, mode=self.padding_mode)
            return F.conv2d(x, self.weight * self.scale, self.bias)
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        out_ch, in_ch, k, _ = self.weight.shape
        return f"{in_ch}, {out_ch}, kernel={k}, padding={self.padding}"


class EqualizedLinear(nn.Module):
    """Linear layer with runtime He scaling."""

    def __init__(self, in_features: int, out_features: int, gain: float = RELU_GAIN) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Normalise each pixel's feature vector to unit RMS (ProGAN); keeps G's signals bounded."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


def minibatch_stddev(x: Tensor, group_size: int) -> Tensor:
    """Append one channel: the mean over C, H, W of each group's per-feature std.

    Groups are contiguous runs of samples, so D([real; fake]) scores exactly as D(real) and
    D(fake) separately whenever the batch is a multiple of the group. A batch that is not a
    multiple uses the largest common divisor. Statistics are taken in fp32 (under autocast the
    features may be bf16, and a variance of near-equal values loses everything in 8 bits).
    """
    n, _, h, w = x.shape
    group = math.gcd(group_size, n)
    y = x.float().reshape(n // group, group, -1)
    std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=1)  # one value per group
    stat = std.to(x.dtype).repeat_interleave(group).reshape(n, 1, 1, 1).expand(n, 1, h, w)
    return torch.cat([x, stat], dim=1)


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


class GeneratorInput(nn.Module):
    """Latent -> 4x4 features: pixel norm, dense to C x 4 x 4 (a 4x4 transposed conv from a
    1x1 latent), then a 3x3 conv; LeakyReLU and pixel norm after each."""

    def __init__(
        self, latent_dim: int, channels: int, padding_mode: str = "zeros", num_classes: int = 0
    ) -> None:
        super().__init__()
        self.channels = channels
        # the label's embedding, as long as the latent, joined to it (conditional models only)
        self.embed = EqualizedLinear(num_classes, latent_dim, gain=1.0) if num_classes else None
        inputs = latent_dim * (2 if num_classes else 1)
        # gain / 4 per output pixel, as ProGAN's dense-to-4x4 layer (gain=sqrt(2)/4 over 16 pixels)
        self.dense = EqualizedLinear(inputs, channels * 16, gain=RELU_GAIN / 4)
        self.conv = EqualizedConv2d(channels, channels, 3, padding_mode=padding_mode)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        z = pixel_norm(z)
        if self.embed is not None:
            z = torch.cat([z, pixel_norm(self.embed(one_hot(labels, self.embed, z)))], dim=1)
        x = self.dense(z).reshape(-1, self.channels, 4, 4)
        x = pixel_norm(lrelu(x))
        return pixel_norm(lrelu(self.conv(x)))


class NoiseInjection(nn.Module):
    """x + weight[c] * noise, one N(0, 1) value per pixel shared by all channels (StyleGAN).

    The weight starts at 0, so a new model is the noiseless one. `generator` makes the noise
    reproducible (generate passes one seeded per shard); without it the global RNG is used,
    whose state training checkpoints keep."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n, _, h, w = x.shape
        noise = torch.randn(
            n, 1, h, w, generator=generator, device="cpu" if generator else x.device
        )
        return x + self.weight * noise.to(x.device, x.dtype)


class ClassModulation(nn.Module):
    """x * (1 + scale[y, c]) + bias[y, c]: a per-class, per-channel affine map of normalised
    features (BigGAN's class-conditional batch norm, here after pixel norm). Starts at the
    identity (zero weights), so a new model is the input-conditioned one."""

    def __init__(self, num_classes: int, channels: int) -> None:
        super().__init__()
        self.affine = EqualizedLinear(num_classes, 2 * channels, gain=1.0)
        nn.init.zeros_(self.affine.weight)

    def forward(self, x: Tensor, onehot: Tensor) -> Tensor:
        scale, bias = self.affine(onehot.to(x.dtype))[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + bias


class GeneratorBlock(nn.Module):
    """Upsample x2 (nearest or bilinear), then two 3x3 convs with LeakyReLU and pixel norm
    (and per-pixel noise before each activation when `noise`; a per-class affine map of the
    output when `num_classes`)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        padding_mode: str = "zeros",
        upsample: str = "nearest",
        noise: bool = False,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv1 = EqualizedConv2d(in_ch, out_ch, 3, padding_mode=padding_mode)
        self.conv2 = EqualizedConv2d(out_ch, out_ch, 3, padding_mode=padding_mode)
        self.noise1 = NoiseInjection(out_ch) if noise else None
        self.noise2 = NoiseInjection(out_ch) if noise else None
        self.modulate = ClassModulation(num_classes, out_ch) if num_classes else None

    def forward(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        onehot: Tensor | None = None,
    ) -> Tensor:
        if self.upsample == "nearest":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.conv1(x)
        if self.noise1 is not None:
            x = self.noise1(x, generator)
        x = pixel_norm(lrelu(x))
        x = self.conv2(x)
        if self.noise2 is not None:
            x = self.noise2(x, generator)
        x = pixel_norm(lrelu(x))
        if self.modulate is not None:
            if onehot is None:
                raise ValueError("this block is modulated by class: pass the one-hot labels")
            x = self.modulate(x, onehot)
        return x


def one_hot(labels: Tensor | None, embed: EqualizedLinear, like: Tensor) -> Tensor:
    """Integer labels (N,) -> one-hot rows for a class embedding; a clear error without them."""
    classes = embed.weight.shape[1]
    if labels is None:
        raise ValueError(f"this model is conditional on {classes} classes: pass labels")
    if labels.shape != (like.shape[0],):
        raise ValueError(f"labels must have shape ({like.shape[0]},), got {tuple(labels.shape)}")
    return F.one_hot(labels.long(), classes).to(like.dtype)


class Generator(nn.Module):
    """z (N, latent_dim) [+ labels (N,)] -> [image at 4x4, 8x8, ..., resolution], each
    (N, image_channels, s, s), linear. `sample` gives the top scale alone."""

    def __init__(self, config: MSGGANConfig) -> None:
        super().__init__()
        self.config = config
        scales = config.scales()
        pad = config.g_padding
        channels = config.g_channels
        self.input = GeneratorInput(config.latent_dim, channels(4), pad, config.num_classes)
        self.blocks = nn.ModuleList(
            GeneratorBlock(
                channels(s // 2),
                channels(s),
                pad,
                config.g_upsample,
                noise=config.g_noise == "all" or (config.g_noise == "coarse" and s < scales[-1]),
                num_classes=config.num_classes if config.g_condition == "modulate" else 0,
            )
            for s in scales[1:]
        )
        self.to_rgb = nn.ModuleList(
            EqualizedConv2d(channels(s), config.image_channels, 1, gain=LINEAR_GAIN) for s in scales
        )

    def forward(self, z: Tensor, labels: Tensor | None = None) -> list[Tensor]:
        x = self.input(z, labels)
        onehot = self._modulation_labels(labels, z)
        images = [self.to_rgb[0](x)]
        for block, to_rgb in zip(self.blocks, self.to_rgb[1:], strict=True):
            x = block(x, None, onehot)
            images.append(to_rgb(x))
        return images

    def _modulation_labels(self, labels: Tensor | None, z: Tensor) -> Tensor | None:
        if self.config.g_condition != "modulate":
            return None
        return one_hot(labels, self.input.embed, z)

    def sample(
        self, z: Tensor, labels: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images (N, image_channels, resolution, resolution) in about [-1, 1]: what generate
        writes.

        The lower scales' to_rgb are skipped: only the top image is kept. `generator` (a CPU
        torch.Generator) draws the per-pixel noise of a `g_noise` model reproducibly."""
        x = self.input(z, labels)
        onehot = self._modulation_labels(labels, z)
        for block in self.blocks:
            x = block(x, generator, onehot)
        return self.to_rgb[-1](x)


# --------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------


class DiscriminatorBlock(nn.Module):
    """Two 3x3 convs with LeakyReLU, then 2x average pooling (the paper's block, mirrored)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = EqualizedConv2d(in_ch, mid_ch, 3)
        self.conv2 = EqualizedConv2d(mid_ch, out_ch, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = lrelu(self.conv1(x))
        x = lrelu(self.conv2(x))
        return F.avg_pool2d(x, 2)


class DiscriminatorOutput(nn.Module):
    """The 4x4 block: minibatch std, 3x3 conv, 4x4 conv to C x 1 x 1, linear score; with
    classes, plus the projection <embed(y), h> / sqrt(C) (Miyato & Koyama 2018), and with
    `classifier` a linear map of h to class logits (AC-GAN's auxiliary classifier)."""

    def __init__(
        self,
        in_ch: int,
        channels: int,
        mbstd_group: int,
        num_classes: int = 0,
        classifier: bool = False,
    ) -> None:
        super().__init__()
        self.mbstd_group = mbstd_group
        self.conv = EqualizedConv2d(in_ch + 1, channels, 3)
        self.conv4x4 = EqualizedConv2d(channels, channels, 4, padding=0)
        self.score = EqualizedLinear(channels, 1, gain=LINEAR_GAIN)
        self.embed = EqualizedLinear(num_classes, channels, gain=1.0) if num_classes else None
        self.classify = (
            EqualizedLinear(channels, num_classes, gain=LINEAR_GAIN) if classifier else None
        )

    def forward(
        self, x: Tensor, labels: Tensor | None = None, logits: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        x = minibatch_stddev(x, self.mbstd_group)
        x = lrelu(self.conv(x))
        h = lrelu(self.conv4x4(x)).flatten(1)
        score = self.score(h).squeeze(1)
        if self.embed is not None:
            projection = self.embed(one_hot(labels, self.embed, h))
            score = score + (projection * h).sum(dim=1) / math.sqrt(h.shape[1])
        if logits:
            if self.classify is None:
                raise ValueError("this discriminator has no classifier (d_classifier=False)")
            return score, self.classify(h)
        return score


class Discriminator(nn.Module):
    """[image at 4x4, ..., resolution] [+ labels (N,)] -> score (N,). Reads the top scale
    first and adds each lower scale's image (1x1 from_rgb, concatenated) on the way down.
    With `logits=True` (a `d_classifier` model): (score, class logits (N, num_classes))."""

    def __init__(self, config: MSGGANConfig) -> None:
        super().__init__()
        self.config = config
        scales = config.scales()
        top, rgb, image = scales[-1], config.rgb_channels, config.image_channels
        self.from_rgb_top = EqualizedConv2d(image, config.channels(top), 1)
        # from_rgb of the scales below the top, ascending (4 .. top/2). The 4x4 one is one
        # channel narrower because minibatch std fills the last of its slots.
        self.from_rgb = nn.ModuleList(
            EqualizedConv2d(image, rgb - 1 if s == 4 else rgb, 1) for s in scales[:-1]
        )
        # blocks ascending by the side they read (8 .. top); the top one has no image to add
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(
                config.channels(s) + (0 if s == top else rgb),
                config.channels(s),
                config.channels(s // 2),
            )
            for s in scales[1:]
        )
        self.output = DiscriminatorOutput(
            config.channels(4) + rgb - 1, config.channels(4), config.mbstd_group,
            config.num_classes, config.d_classifier,
        )  # fmt: skip

    def forward(
        self, images: list[Tensor], labels: Tensor | None = None, logits: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        if len(images) != len(self.blocks) + 1:
            raise ValueError(f"expected {len(self.blocks) + 1} scales, got {len(images)}")
        x = lrelu(self.from_rgb_top(images[-1]))
        x = self.blocks[-1](x)
        # walk down: scale index i has side 4 * 2**i; blocks[i - 1] reads side 4 * 2**i
        for i in range(len(images) - 2, 0, -1):
            x = torch.cat([lrelu(self.from_rgb[i](images[i])), x], dim=1)
            x = self.blocks[i - 1](x)
        x = torch.cat([lrelu(self.from_rgb[0](images[0])), x], dim=1)
        return self.output(x, labels, logits)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def image_pyramid(images: Tensor, scales: list[int]) -> list[Tensor]:
    """Full-resolution real images -> one average-pooled copy per scale, in the given order.

    Average pooling by the whole factor equals repeated 2x pooling, which is how the generator's
    lower outputs are meant to relate to its top one.
    """
    side = images.shape[-1]
    out = []
    for s in scales:
        if side % s:
            raise ValueError(f"scale {s} does not divide image side {side}")
        out.append(images if s == side else F.avg_pool2d(images, side // s))
    return out


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
