"""Exponential moving average of the generator's weights, the copy used for sampling.

Averaging the iterates smooths out the oscillation of adversarial training (Yazici et al.,
2019); ProGAN, StyleGAN and MSG-GAN all sample from such a copy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode, starting equal to it."""
    ema = copy.deepcopy(model).eval()
    for param in ema.parameters():
        param.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers copied as they are.

    Buffers (running statistics, counters) are not averaged: an average of them means nothing.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    ema_params = list(ema.parameters())
    model_params = [p.detach() for p in model.parameters()]
    if len(ema_params) != len(model_params):
        raise ValueError("ema and model have different parameter lists")
    # one fused call over all tensors instead of a Python loop of small kernels
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for ema_buf, buf in zip(ema.buffers(), model.buffers(), strict=True):
        ema_buf.copy_(buf)
