"""synthbreast's MSG-GAN training step against the public one (akanimax/BMSG-GAN), same run.

    git -C MIRROR archive HEAD sourcecode | tar -x -C /tmp/bmsg     # the public code, outside
    python bench/peer_msggan.py --peer /tmp/bmsg/sourcecode          # paper config (an hour)
    python bench/peer_msggan.py --peer /tmp/bmsg/sourcecode --small  # reduced sizes (seconds)

One iteration = one D step (WGAN-GP with penalty 10 and drift 0.001) and one G step, then the
generator's EMA, on a fixed random real batch (data loading is not timed), RMSprop lr 1e-4,
fp32, at the paper's config: 64 px, 5 blocks (the public code's depth 5), 512 channels,
latent 512, batch 16. Each side runs the step as its own training loop does:

- peer: its own Generator, Discriminator, WGAN_GP loss and update_average, imported from
  --peer; nothing of it is copied here. Its loop runs G with autograd on in the D step, never
  freezes D for the G step, and normalises latents. Its WGAN-GP penalty crashes on the list of
  scales and its "wgan-gp" option trains without one (use_gp=False), so this bench adds the
  penalty around its loss: synthbreast's `gradient_penalty` on the peer's D (one alpha per
  sample for all scales, one norm over all scales), the same arithmetic on both sides.
- synthbreast: the step of train/gan.py (G under no_grad for the D step, D frozen for the G
  step) with the loss registry (`d_loss`, `g_loss`) and `update_ema`.

Rounds alternate the sides (peer, synthbreast, then each option), so that load from other work
on the machine hits all of them alike; the ratio is of mean s/iter over all rounds. Then the
options that change the arithmetic but not the result quality, each on its own (synthbreast):
bf16 autocast (the penalty stays fp32 by design), a lazy gradient penalty every k steps
(timed as (1 penalty step + (k-1) steps without) / k), channels_last, torch.compile.

Printed: img/s and s/kimg per side, FLOPs per image (counted over one full iteration with a
TorchDispatchMode over torch's FLOP formulas), parameters, `ratio X.XX`, the FLOP rate against
the plain-conv ceiling of the step's own shapes (bench/ceilings.py), and memory: the RSS
high-water mark during each side's first iteration (VmHWM reset per side), over the RSS before.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from ceilings import ConvShape, conv_rate, conv_shapes, machine_line
from msggan_step import CountFlops

from synthbreast.models.msggan import Discriminator, Generator, MSGGANConfig, image_pyramid
from synthbreast.train.ema import update_ema
from synthbreast.train.losses import LossSettings, d_loss, g_loss, gradient_penalty, requires_grad

EMA_DECAY = 0.999  # the public code's ema_decay; synthbreast's loop ramps it, cost is the same


@dataclass(frozen=True)
class Settings:
    """The config both sides are built from, and the arithmetic options (synthbreast only)."""

    resolution: int = 64
    channels: int = 512  # the public code ties its widths to the latent size
    latent: int = 512
    batch: int = 16
    gp_weight: float = 10.0
    lr: float = 1e-4
    bf16: bool = False
    channels_last: bool = False
    compile: str = ""  # "": eager; "G": the generator compiled; "GD": both (see SelfStep)
    gp_interval: int = 1
    device: str = "cpu"  # synthbreast's side only (bench/gpu_paper.py)

    @classmethod
    def small(cls) -> Settings:
        # the public code needs depth >= 4 (32 px); widths 32 so a step takes milliseconds
        return cls(resolution=32, channels=32, latent=32, batch=4)

    @property
    def depth(self) -> int:
        return int(math.log2(self.resolution)) - 1

    def describe(self) -> str:
        return (
            f"{self.resolution} px, depth {self.depth}, {self.channels} channels, latent "
            f"{self.latent}, batch {self.batch}, WGAN-GP {self.gp_weight:g}, RMSprop {self.lr:g}"
        )


def fixed_real(settings: Settings) -> torch.Tensor:
    side = settings.resolution
    return torch.randn(settings.batch, 3, side, side).to(settings.device)


def param_count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


class PeerStep:
    """One iteration of the public MSG-GAN's training loop (MSG_GAN.train), penalty added."""

    name = "peer (BMSG-GAN)"

    def __init__(self, settings: Settings, peer: Path) -> None:
        sys.path.insert(0, str(peer))
        from MSG_GAN.CustomLayers import update_average
        from MSG_GAN.GAN import Discriminator as PeerD
        from MSG_GAN.GAN import Generator as PeerG
        from MSG_GAN.Losses import WGAN_GP

        self.settings = settings
        self.G = PeerG(settings.depth, settings.latent, use_eql=True)
        self.D = PeerD(settings.depth, settings.channels, use_eql=True)
        self.G.train(), self.D.train()
        self.G_shadow = copy.deepcopy(self.G)
        self.update_average = update_average
        update_average(self.G_shadow, self.G, beta=0)
        self.loss = WGAN_GP(self.D, drift=0.001, use_gp=False)  # its own GP cannot take lists
        self.g_opt = torch.optim.RMSprop(self.G.parameters(), lr=settings.lr)
        self.d_opt = torch.optim.RMSprop(self.D.parameters(), lr=settings.lr)
        # the pyramid as its loop builds it: avg_pool2d by 2^i, ascending
        real = fixed_real(settings)
        pyramid = [real] + [F.avg_pool2d(real, 2**i) for i in range(1, settings.depth)]
        self.real = list(reversed(pyramid))

    def params(self) -> int:
        return param_count(self.G, self.D)

    def __call__(self) -> None:
        s = self.settings
        z = torch.randn(s.batch, s.latent)
        z = z / z.norm(dim=-1, keepdim=True) * (s.latent**0.5)  # normalize_latents=True
        # D step (optimize_discriminator): G with autograd on, detached after
        fake = [x.detach() for x in self.G(z)]
        loss = self.loss.dis_loss(self.real, fake)
        penalty, _ = gradient_penalty(self.D, self.real, fake, s.gp_weight)  # added here
        loss = loss + penalty
        self.d_opt.zero_grad()
        loss.backward()
        self.d_opt.step()
        # G step (optimize_generator): D's weights still record gradients, as in its code
        loss = self.loss.gen_loss(self.real, self.G(z))
        self.g_opt.zero_grad()
        loss.backward()
        self.g_opt.step()
        self.update_average(self.G_shadow, self.G, EMA_DECAY)


class SelfStep:
    """One iteration of synthbreast's train/gan.py loop (data loading and logging left out)."""

    def __init__(self, settings: Settings, name: str = "synthbreast") -> None:
        self.settings, self.name = settings, name
        self.config = MSGGANConfig(
            resolution=settings.resolution,
            latent_dim=settings.latent,
            fmap_max=settings.channels,
        )
        self.device = torch.device(settings.device)
        self.G = Generator(self.config).to(self.device)
        self.D = Discriminator(self.config).to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.g_opt = torch.optim.RMSprop(self.G.parameters(), lr=settings.lr)
        self.d_opt = torch.optim.RMSprop(self.D.parameters(), lr=settings.lr)
        self.losses = LossSettings(gp_weight=settings.gp_weight, gp_interval=settings.gp_interval)
        self.real = image_pyramid(fixed_real(settings), self.config.scales())
        if settings.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
            self.real = [x.contiguous(memory_format=torch.channels_last) for x in self.real]
        # torch.compile: "G" compiles the generator only, since the D of the gradient penalty
        # is differentiated twice (create_graph), which compiled graphs do not support; "GD"
        # tries D too (a failure is reported by the caller)
        self.G_run = torch.compile(self.G) if settings.compile else self.G
        self.D_run = torch.compile(self.D) if settings.compile == "GD" else self.D
        self.step = 0

    def params(self) -> int:
        return param_count(self.G, self.D)

    def autocast(self):
        if self.settings.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def __call__(self) -> None:
        s = self.settings
        # D step: G under no_grad, the loss's penalty inside it
        requires_grad(self.D, True)
        z = torch.randn(s.batch, s.latent, device=self.device)
        alpha = torch.rand(s.batch, device=self.device)
        with torch.no_grad(), self.autocast():
            fake = self.G_run(z)
        with self.autocast():
            loss, _ = d_loss("wgan-gp", self.D_run, self.real, fake, self.losses, self.step, alpha)
        self.d_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.d_opt.step()
        # G step: D frozen, so its backward computes input gradients only
        requires_grad(self.D, False)
        z = torch.randn(s.batch, s.latent, device=self.device)
        with self.autocast():
            loss, _ = g_loss("wgan-gp", self.D_run, self.G_run(z))
        self.g_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.g_opt.step()
        update_ema(self.G_ema, self.G, EMA_DECAY)
        self.step += 1


class LazyStep(SelfStep):
    """synthbreast with the penalty every k steps: times the k - 1 steps without it; the
    caller amortises one penalty step (the fp32 side's time) over the k."""

    def __call__(self) -> None:
        self.step = 1  # step % k != 0: no penalty this step
        super().__call__()


# --- measuring ---------------------------------------------------------------------------------


def time_iters(step, iters: int) -> list[tuple[float, float]]:
    """(wall seconds, CPU seconds of this process) per iteration. Under contention the CPU
    time is the steadier figure: it does not count the time other work held the cores."""
    seconds = []
    for _ in range(iters):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        seconds.append((time.perf_counter() - wall, time.process_time() - cpu))
    return seconds


def count_flops(step) -> int:
    with CountFlops() as counter:
        step()
    return counter.total


def rss_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def peak_rss_of(step) -> dict[str, float]:
    """RSS high-water mark while `step()` runs, in this process: the kernel's VmHWM reset
    first (/proc/self/clear_refs), and the increment over the RSS just before, GiB."""
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    peak = rss_kib("VmHWM")
    return {"peak_gib": peak / 2**20, "step_gib": (peak - before) / 2**20}


OPTIONS = ("bf16", "lazy", "channels_last", "compile", "bf16+lazy", "bf16+channels_last",
           "bf16+lazy+channels_last")  # fmt: skip


def option_steps(settings: Settings, args: argparse.Namespace) -> list[SelfStep]:
    k = args.gp_interval
    steps = {
        "bf16": lambda: SelfStep(replace(settings, bf16=True), "bf16 autocast"),
        "lazy": lambda: LazyStep(replace(settings, gp_interval=k), f"lazy GP every {k}"),
        "channels_last": lambda: SelfStep(replace(settings, channels_last=True), "channels_last"),
        "compile": lambda: SelfStep(replace(settings, compile="G"), "torch.compile (G)"),
        "bf16+lazy": lambda: LazyStep(
            replace(settings, bf16=True, gp_interval=k), f"bf16 + lazy GP {k}"
        ),
        "bf16+channels_last": lambda: SelfStep(
            replace(settings, bf16=True, channels_last=True), "bf16 + channels_last"
        ),
        "bf16+lazy+channels_last": lambda: LazyStep(
            replace(settings, bf16=True, gp_interval=k, channels_last=True),
            f"bf16 + lazy {k} + cl",
        ),
    }
    return [steps[name]() for name in args.options]


def step_conv_shapes(settings: Settings, small_batch: int = 2) -> Counter[ConvShape]:
    """The conv shapes synthbreast's step runs at `settings.batch`, recorded on a small batch
    (cheap) and taken back to the real one."""
    small = conv_shapes(SelfStep(replace(settings, batch=min(small_batch, settings.batch))))
    shapes: Counter[ConvShape] = Counter()
    for shape, count in small.items():
        shapes[replace(shape, input=(settings.batch, *shape.input[1:]))] += count
    return shapes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", type=Path, required=True, help="BMSG-GAN's sourcecode folder")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per side per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="reduced config: a smoke test")
    parser.add_argument("--batch", type=int, default=None, help="[16; 4 with --small]")
    parser.add_argument("--gp-interval", type=int, default=4, help="k of the lazy penalty")
    parser.add_argument(
        "--options", nargs="*", choices=OPTIONS, default=list(OPTIONS), help="[all]; none: fp32"
    )
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip the conv ceiling (bench/ceilings.py has it)"
    )
    parser.add_argument(
        "--flops-batch", type=int, default=2, help="batch of the FLOP count (per image: same)"
    )
    args = parser.parse_args()
    if not (args.peer / "MSG_GAN" / "GAN.py").is_file():
        parser.error(f"--peer {args.peer}: no MSG_GAN/GAN.py there (give the sourcecode folder)")
    return args


def main() -> None:
    args = parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # a fixed threshold: glibc then maps large blocks and unmaps them when freed, so one
        # side's freed memory is not reused by the next unseen and each RSS peak is its own
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    settings = Settings.small() if args.small else Settings()
    if args.batch:
        settings = replace(settings, batch=args.batch)
    print(machine_line())
    print(
        f"config: {settings.describe()}, fp32; {args.iters} timed iterations per side per "
        f"round after {args.warmup} warm-up, {args.rounds} rounds, sides alternating"
    )
    print(
        "peer: akanimax/BMSG-GAN imported from --peer; its WGAN-GP has no working penalty on "
        "multi-scale input, so this bench adds one around its loss (the same function as "
        "synthbreast's, same arithmetic)"
    )
    torch.manual_seed(0)
    peer, mine = PeerStep(settings, args.peer), SelfStep(settings)
    sides = [peer, mine]
    options = option_steps(settings, args)
    failed: dict[str, str] = {}
    memory: dict[str, dict[str, float]] = {}
    for step in [*sides, *options]:
        try:
            for i in range(args.warmup):
                if i == 0:  # the first iteration allocates the most (optimiser state too)
                    memory[step.name] = peak_rss_of(step)
                else:
                    step()
        except Exception as err:  # e.g. torch.compile without a compiler here
            failed[step.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    options = [s for s in options if s.name not in failed]

    # FLOPs and the conv ceiling of the step's own shapes (fp32, and bf16 for the bf16 side)
    # FLOPs per image are the batch's FLOPs / batch, so they are counted on a small batch
    counted = replace(settings, batch=min(args.flops_batch, settings.batch))
    flops = {
        peer.name: count_flops(PeerStep(counted, args.peer)) / counted.batch,
        mine.name: count_flops(SelfStep(counted)) / counted.batch,
    }
    shapes, ceiling = step_conv_shapes(settings, counted.batch), {}
    if not args.no_ceiling:
        ceiling["fp32"] = conv_rate(shapes, torch.float32)
        if any(s.settings.bf16 for s in options):
            ceiling["bf16"] = conv_rate(shapes, torch.bfloat16)

    # timed rounds, alternating
    times: dict[str, list[tuple[float, float]]] = {s.name: [] for s in [*sides, *options]}
    for r in range(args.rounds):
        for step in [*sides, *options]:
            seconds = time_iters(step, args.iters)
            times[step.name] += seconds
            shown = " ".join(f"{w:7.2f} (cpu {c:.2f})" for w, c in seconds)
            print(f"round {r} {step.name:<22} {shown} s", flush=True)
    mean = {name: sum(w for w, _ in t) / len(t) for name, t in times.items()}
    cpu = {name: sum(c for _, c in t) / len(t) for name, t in times.items()}
    k = args.gp_interval
    for step in options:  # amortise one penalty step over k: that of the same settings
        if isinstance(step, LazyStep):  # without the lazy penalty, else the fp32 side's
            alike = replace(step.settings, gp_interval=1)
            full = next(
                (o.name for o in options if not isinstance(o, LazyStep) and o.settings == alike),
                mine.name,
            )
            for m in (mean, cpu):
                m[step.name] = (m[full] + (k - 1) * m[step.name]) / k

    # the table
    b = settings.batch
    print(f"\n{'side':<24}{'img/s':>8}{'s/kimg':>9}{'ratio':>7}{'cpu ratio':>10}{'GFLOP/img':>11}"
          f"{'GFLOP/s':>9}{'of ceiling':>11}{'params':>13}{'step RSS':>10}")  # fmt: skip
    for step in [*sides, *options]:
        name = step.name
        img_s = b / mean[name]
        per_img = flops.get(name, flops[mine.name]) / 1e9  # options: same work as fp32
        if isinstance(step, LazyStep):
            per_img = None  # amortised: fewer FLOPs per image by design
        rate = per_img * img_s if per_img else None
        dtype = "bf16" if getattr(step, "settings", settings).bf16 else "fp32"
        frac = rate / ceiling[dtype] if rate and dtype in ceiling else None
        mem = f"+{memory[name]['step_gib']:.2f} GiB" if name in memory else "n/a"
        print(
            f"{name:<24}{img_s:>8.3f}{1000 / img_s:>9.0f}{mean[peer.name] / mean[name]:>7.2f}"
            f"{cpu[peer.name] / cpu[name]:>10.2f}"
            f"{per_img if per_img else float('nan'):>11.2f}{rate if rate else float('nan'):>9.1f}"
            f"{(f'{frac:.0%} ' + dtype) if frac else 'n/a':>11}{step.params():>13,}"
            f"{mem:>10}"
        )
    for name, reason in failed.items():
        print(f"{name:<24} skipped: {reason}")
    print(f"\nratio {mean[peer.name] / mean[mine.name]:.2f}")
    print(f"cpu ratio {cpu[peer.name] / cpu[mine.name]:.2f} (CPU seconds per iteration)")
    if ceiling:
        print(
            f"ceiling: plain conv2d fwd+bwd of the step's {len(shapes)} conv shapes on random "
            + ", ".join(f"{d} {v:.1f} GFLOP/s" for d, v in ceiling.items())
        )
    print(
        "step RSS: the RSS high-water mark during each side's first iteration over the RSS "
        "before it (VmHWM reset through /proc/self/clear_refs), in this process; process peaks: "
        + ", ".join(f"{n} {m['peak_gib']:.2f}" for n, m in memory.items())
        + " GiB"
    )
    print(
        f"FLOPs: one full iteration at batch {counted.batch} under a TorchDispatchMode (torch's "
        "formulas), / batch; "
        "the peer's include the D weight gradients its G step computes"
    )
    print(
        "lazy GP: mean of 1 penalty step (the side of the same options without it, else the "
        "fp32 side) and k-1 steps without; "
        "bf16: autocast on the CPU, the penalty's D pass stays fp32"
    )


if __name__ == "__main__":
    main()
