"""Time full MSG-GAN training iterations: one D step with gradient penalty, one G step.

Prints images/s, seconds/iteration and peak RSS for the paper's config by default (64 px,
5 blocks, 512 channels, latent 512, batch 16, RMSprop lr 1e-4). Data loading is not timed:
the real batch is a fixed random tensor.

    python bench/msggan_step.py                          # paper config, fp32
    python bench/msggan_step.py --precision bf16         # bf16 autocast (GP stays fp32)
    python bench/msggan_step.py --width 0.125 --iters 10 # the narrow CPU demo model
    python bench/msggan_step.py --public-style-step      # redo the public code's wasted work
"""

from __future__ import annotations

import argparse
import resource
import time
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from synthbreast.models.msggan import (
    Discriminator,
    Generator,
    MSGGANConfig,
    image_pyramid,
    param_count,
)
from synthbreast.train.losses import discriminator_loss, generator_loss, requires_grad


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = paper)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--latent", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--flops", action="store_true", help="count FLOPs of one iteration")
    parser.add_argument(
        "--public-style-step",
        action="store_true",
        help="G with autograd in the D step and D weight grads in the G step, as the public code",
    )
    return parser.parse_args()


class Step:
    """One training iteration; holds the models, optimisers and a fixed real batch."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.config = MSGGANConfig(
            resolution=args.resolution, latent_dim=args.latent, width=args.width
        )
        self.G, self.D = Generator(self.config), Discriminator(self.config)
        self.g_opt = torch.optim.RMSprop(self.G.parameters(), lr=1e-4)
        self.d_opt = torch.optim.RMSprop(self.D.parameters(), lr=1e-4)
        self.batch = args.batch
        real = torch.randn(args.batch, 3, args.resolution, args.resolution)
        self.real_scales = image_pyramid(real, self.config.scales())
        self.bf16 = args.precision == "bf16"
        self.public_style = args.public_style_step

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def latent(self) -> torch.Tensor:
        return torch.randn(self.batch, self.config.latent_dim)

    def __call__(self) -> dict[str, float]:
        # D step: fakes without G's graph (unless mimicking the public code)
        requires_grad(self.D, True)
        no_grad = nullcontext() if self.public_style else torch.no_grad()
        with no_grad, self.autocast():
            fake = [x.detach() for x in self.G(self.latent())]
        with self.autocast():
            d_loss, stats = discriminator_loss(self.D, self.real_scales, fake)
        self.d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_opt.step()

        # G step: D frozen, so its backward computes input gradients only
        requires_grad(self.D, self.public_style)
        with self.autocast():
            g_loss, g_stats = generator_loss(self.D, self.G(self.latent()))
        self.g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        self.g_opt.step()
        return {**stats, **g_stats}


class CountFlops(TorchDispatchMode):
    """Sum of torch's FLOP formulas over every op run inside. torch's FlopCounterMode cannot be
    used: its module tracker hooks break autograd.grad with respect to leaf inputs (the GP)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step = Step(args)
    cfg = step.config
    print(f"config: {cfg.to_dict()}")
    print(f"channels per scale: { {s: cfg.channels(s) for s in cfg.scales()} }")
    print(f"params: G {param_count(step.G):,}  D {param_count(step.D):,}")
    print(
        f"batch {args.batch}, precision {args.precision}, threads {torch.get_num_threads()}, "
        f"public-style step {args.public_style_step}"
    )

    if args.flops:
        with CountFlops() as counter:
            step()
        flops = counter.total
        print(f"FLOPs per iteration: {flops / 1e9:.1f} G ({flops / 1e9 / args.batch:.2f} G/img)")
    for _ in range(args.warmup):
        step()

    times = []
    for i in range(args.iters):
        start = time.perf_counter()
        stats = step()
        times.append(time.perf_counter() - start)
        print(
            f"iter {i}: {times[-1]:.2f} s  d_loss {stats['d_loss']:.3f}  gp {stats['gp']:.3f}  "
            f"g_loss {stats['g_loss']:.3f}"
        )
    mean = sum(times) / len(times)
    print(
        f"RESULT s/iter {mean:.3f} (min {min(times):.3f})  images/s {args.batch / mean:.3f}  "
        f"peak RSS {peak_rss_gib():.2f} GiB"
    )


if __name__ == "__main__":
    main()
