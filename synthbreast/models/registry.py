"""GAN models chosen by name (`train-gan --model NAME`), as StyleGAN2-ADA builds G and D by name.

A spec says everything the training loop and `generate` need to know about a model and nothing
more: its config dataclass, how to build G and D from it, what the discriminator reads of a
batch of real images, and whether it takes class labels. The loop never imports a model module;
a checkpoint records the spec's name and the config, so `generate` rebuilds G from it alone.

Every generator here has `G.sample(z, labels, generator=None)` -> images (N, C, H, W) in about
[-1, 1] (`generator`: a CPU torch.Generator for any randomness beyond z, e.g. per-pixel noise,
so that generated shards stay reproducible) and `G.config.latent_dim`; `G(z, labels)` and
`D(real_input(images), labels)` are the two sides of the training loss.

Adding a model: write its nn.Modules in a module of their own, then register a `GANSpec` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from synthbreast.errors import UserError
from synthbreast.models import msggan, singan


@dataclass(frozen=True)
class GANSpec:
    name: str
    description: str
    config_type: type  # a dataclass with to_dict() / from_dict()
    generator: Callable[[Any], nn.Module]
    discriminator: Callable[[Any], nn.Module]
    real_input: Callable[[Tensor, Any], Any]  # full-size reals -> what D reads
    conditional: bool  # one model for all classes, labels in G and D
    # which command trains it (TRAINERS): MSG-GANs share train/gan.py's loop; SinGAN learns one
    # image scale by scale (train/singan.py), so `train-gan --model singan` is refused
    trainer: str = "gan"


def _pyramid(images: Tensor, config: msggan.MSGGANConfig) -> list[Tensor]:
    return msggan.image_pyramid(images, config.scales())


def _singan_pyramid(image: Tensor, config: singan.SinGANConfig) -> list[Tensor]:
    return singan.image_pyramid(image, config.sizes)


TRAINERS = {"gan": "synthbreast train-gan", "singan": "synthbreast train-singan"}


MODELS: dict[str, GANSpec] = {
    spec.name: spec
    for spec in (
        GANSpec(
            name="msggan",
            description="MSG-GAN (the paper): one unconditional model per class",
            config_type=msggan.MSGGANConfig,
            generator=msggan.Generator,
            discriminator=msggan.Discriminator,
            real_input=_pyramid,
            conditional=False,
        ),
        GANSpec(
            name="msggan-cond",
            description="conditional MSG-GAN: one model for every class, label embedding in G, "
            "projection discriminator",
            config_type=msggan.MSGGANConfig,
            generator=msggan.Generator,
            discriminator=msggan.Discriminator,
            real_input=_pyramid,
            conditional=True,
        ),
        GANSpec(
            name="singan",
            description="SinGAN (Shaham et al. 2019): one pyramid of patch GANs per image, "
            "trained by `synthbreast train-singan`",
            config_type=singan.SinGANConfig,
            generator=singan.SinGAN,
            discriminator=singan.build_discriminators,
            real_input=_singan_pyramid,
            conditional=False,
            trainer="singan",
        ),
    )
}

# Checkpoints written before the registry have no model name: they are all MSG-GAN.
LEGACY_MODEL = "msggan"


def get_model(name: str, trainer: str = "gan") -> GANSpec:
    """The spec of model `name`, which must be one that `trainer`'s command trains."""
    if name not in MODELS:
        raise UserError(f"--model {name!r} unknown; choose from {', '.join(MODELS)}")
    spec = MODELS[name]
    if spec.trainer != trainer:
        raise UserError(
            f"--model {name} is trained by `{TRAINERS[spec.trainer]}`, not "
            f"`{TRAINERS[trainer]}`: run that command"
        )
    return spec


def build_config(spec: GANSpec, data: dict[str, Any]) -> Any:
    """The spec's config from a checkpoint's JSON; unknown keys are an error."""
    config = spec.config_type.from_dict(data)
    if spec.conditional != config.conditional:
        kind = "conditional" if spec.conditional else "unconditional"
        classes = getattr(config, "num_classes", 0)
        raise ValueError(f"model {spec.name} is {kind}, but its config has num_classes={classes}")
    return config
