"""The machine's own limits, measured here, and the fraction of them each hot path reaches.

Ceilings (each on random tensors, nothing of synthbreast in the way):
- GEMM rate: a square matmul in fp32 and bf16, GFLOP/s;
- conv rate: plain conv2d forward + backward (input and weight gradients) of exactly the
  convolution shapes a model runs, weighted by how often it runs each, GFLOP/s;
- PNG decode: one core decoding the real sample's 50x50 patches (bytes in memory), img/s;
- bare ResNet18: torchvision's resnet18 forward at 224 px on a random float batch, img/s.

Hot paths and the fraction of their ceiling (`python bench/ceilings.py`):
- the MSG-GAN training step (paper config, fp32) against the conv rate of its own shapes;
- the classifier feature pass at 224 px (`FeatureCache.compute`, as classify and
  bench/classify_speed.py run it) against the bare ResNet18 forward, with its parts timed
  apart (preprocess, backbone) so that the gap has a name;
- shard streaming (bench/ingest_and_stream.py) per worker after start-up, against the decode
  rate of as many processes decoding at once (the per-worker ceiling) and of one alone.

    python bench/ceilings.py                 # everything, paper config (minutes on 2 cores)
    python bench/ceilings.py --small         # reduced sizes, seconds: a smoke test
    python bench/ceilings.py --only gemm conv decode resnet

Other benches import the ceiling functions (`gemm_rate`, `conv_shapes`, `conv_rate`,
`png_decode_rate`, `resnet18_rate`) to print a fraction beside their own figures. On a shared
machine every figure here is contended alike; say so beside them.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

REAL_SAMPLE = "/work/shared/real-sample/idc"


def machine_line() -> str:
    """What the figures ran on, and how loaded it was (load average over 1 minute)."""
    load = os.getloadavg()[0]
    return (
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, load average {load:.1f} "
        f"({'contended: other work shares the cores' if load > os.cpu_count() else 'quiet'})"
    )


def timed_rate(work: Callable[[], object], seconds: float, warmup: int = 1) -> float:
    """Calls of `work` per second, repeated until at least `seconds` have passed."""
    for _ in range(warmup):
        work()
    calls, start = 0, time.perf_counter()
    while True:
        work()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls / elapsed


# --- GEMM -------------------------------------------------------------------------------------


def gemm_rate(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of an n x n x n matmul (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return timed_rate(lambda: a @ b, seconds) * 2 * n**3 / 1e9


# --- convolutions of a model's own shapes ----------------------------------------------------


@dataclass(frozen=True)
class ConvShape:
    input: tuple[int, ...]
    weight: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int

    def output(self) -> tuple[int, ...]:
        n, _, h, w = self.input
        c_out, _, kh, kw = self.weight
        (sh, sw), (ph, pw) = self.stride, self.padding
        return (n, c_out, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)

    def forward_flops(self) -> int:
        _, c_in_per_group, kh, kw = self.weight
        return 2 * torch.Size(self.output()).numel() * c_in_per_group * kh * kw


class _RecordConvs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: Counter[ConvShape] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._overloadpacket is torch.ops.aten.convolution and not args[6]:  # not transposed
            x, w = args[0], args[1]
            shape = ConvShape(
                tuple(x.shape), tuple(w.shape), tuple(args[3]), tuple(args[4]), int(args[8])
            )
            self.shapes[shape] += 1
        return func(*args, **kwargs)


def conv_shapes(run: Callable[[], object]) -> Counter[ConvShape]:
    """The forward convolutions `run()` executes, with how many times each runs."""
    with _RecordConvs() as recorder:
        run()
    return recorder.shapes


def conv_rate(
    shapes: Counter[ConvShape],
    dtype: torch.dtype = torch.float32,
    backward: bool = True,
    reps: int = 2,
    channels_last: bool = False,
) -> float:
    """GFLOP/s of plain F.conv2d over these shapes on random tensors, each weighted by its
    count: forward, and with `backward` the input and weight gradients too (3x the FLOPs)."""
    total_flops = total_seconds = 0.0
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for shape, count in shapes.items():
        x = torch.randn(shape.input, dtype=dtype).to(memory_format=fmt)
        w = torch.randn(shape.weight, dtype=dtype).to(memory_format=fmt)
        x.requires_grad_(backward)
        w.requires_grad_(backward)

        def once(x=x, w=w, shape=shape):
            y = F.conv2d(x, w, None, shape.stride, shape.padding, 1, shape.groups)
            if backward:
                torch.autograd.grad(y, (x, w), torch.ones_like(y))

        once()  # warm-up: oneDNN picks and caches its kernel
        start = time.perf_counter()
        for _ in range(reps):
            once()
        seconds = (time.perf_counter() - start) / reps
        total_seconds += seconds * count
        total_flops += shape.forward_flops() * (3 if backward else 1) * count
    return total_flops / total_seconds / 1e9


# --- PNG decode and a bare ResNet18 -----------------------------------------------------------


def sample_png_blobs(limit: int = 2000) -> list[bytes]:
    """PNG bytes of the real sample's patches (random 50x50 PNGs when it is not here)."""
    paths = sorted(glob.glob(f"{REAL_SAMPLE}/**/*.png", recursive=True))[:limit]
    if paths:
        return [open(p, "rb").read() for p in paths]
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(limit):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(out, "PNG")
        blobs.append(out.getvalue())
    return blobs


def png_decode_rate(blobs: list[bytes]) -> float:
    """Images/s one core decodes to RGB arrays, as the shard reader does (bytes in memory)."""
    import numpy as np

    from synthbreast.data.shards import decode_image

    start = time.perf_counter()
    for blob in blobs:
        np.asarray(decode_image(blob))
    return len(blobs) / (time.perf_counter() - start)


def resnet18_rate(batch: int = 32, size: int = 224, seconds: float = 4.0) -> float:
    """Images/s of torchvision's resnet18 forward (eval, no grad) on a random float batch."""
    import torchvision

    model = torchvision.models.resnet18().eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        return timed_rate(lambda: model(x), seconds) * batch


def resnet18_flops(size: int = 224) -> int:
    """Forward FLOPs of one image through resnet18 (convolutions and the fc)."""
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    model = torchvision.models.resnet18().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops()


# --- the hot paths against their ceilings -----------------------------------------------------


def feature_pass(images: int, size: int, batch: int) -> dict[str, float]:
    """img/s of classify's feature pass (`FeatureCache.compute`) on uint8 50x50 patches, and of
    its two parts alone: `preprocess` (to float, resize, normalise) and the backbone."""
    from synthbreast.eval.classify import FeatureCache, preprocess
    from synthbreast.models.classifier import backbone_features, build_classifier

    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, 3, 50, 50), dtype=torch.uint8, generator=generator)
    torch.manual_seed(0)
    model = build_classifier("resnet18").eval()
    cpu = torch.device("cpu")
    cache = FeatureCache("unused", model, "resnet18", size, cpu, batch)  # nothing written
    cache.compute(x[:batch])  # warm-up
    start = time.perf_counter()
    cache.compute(x)
    whole = images / (time.perf_counter() - start)
    start = time.perf_counter()
    ready = [preprocess(x[i : i + batch], size, cpu) for i in range(0, images, batch)]
    prep = images / (time.perf_counter() - start)
    model = model.to(memory_format=torch.contiguous_format)  # compute() made it channels_last
    start = time.perf_counter()
    with torch.no_grad():
        for b in ready:
            backbone_features(model, b)
    backbone = images / (time.perf_counter() - start)
    # the proposed fix: channels_last weights and inputs (oneDNN's native layout, no reorder
    # of every activation) in inference mode; same arithmetic, same features up to rounding
    model = model.to(memory_format=torch.channels_last)
    ready = [b.contiguous(memory_format=torch.channels_last) for b in ready]
    with torch.inference_mode():
        backbone_features(model, ready[0])  # warm-up of the new layout's kernels
        start = time.perf_counter()
        for b in ready:
            backbone_features(model, b)
    channels_last = images / (time.perf_counter() - start)
    return {
        "compute": whole,
        "preprocess": prep,
        "backbone": backbone,
        "backbone_channels_last": channels_last,
    }


def training_step_fraction(small: bool, iters: int, batch: int | None) -> dict[str, float]:
    """The synthbreast MSG-GAN step's FLOP rate against the conv rate of its own shapes
    (bench/peer_msggan.py prints the same beside the peer)."""
    from peer_msggan import SelfStep, Settings, count_flops, step_conv_shapes

    settings = Settings.small() if small else Settings()
    settings = replace(settings, batch=batch or settings.batch)
    counted = replace(settings, batch=min(2, settings.batch))
    per_image = count_flops(SelfStep(counted)) / counted.batch
    step = SelfStep(settings)
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        step()
    per_iter = (time.perf_counter() - start) / iters
    achieved = per_image * settings.batch / per_iter / 1e9
    ceiling = conv_rate(step_conv_shapes(settings))
    return {"gflop_per_img": per_image / 1e9, "achieved": achieved, "ceiling": ceiling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parts = ["gemm", "conv", "decode", "resnet", "step", "features", "stream"]
    parser.add_argument("--only", nargs="+", choices=parts, default=parts)
    parser.add_argument("--small", action="store_true", help="reduced sizes: a smoke test")
    parser.add_argument("--iters", type=int, default=1, help="timed training iterations")
    parser.add_argument("--batch", type=int, help="the training step's batch [16; small: 4]")
    args = parser.parse_args()
    small = args.small
    print(machine_line())
    print("figures measured now on a shared machine are contended; ratios within a run are fair")
    seconds = 0.5 if small else 2.0

    if "gemm" in args.only:
        n = 512 if small else 2048
        for dtype in (torch.float32, torch.bfloat16):
            rate = gemm_rate(dtype, n, seconds)
            print(f"GEMM {n}^3 {str(dtype).removeprefix('torch.'):<8} {rate:8.1f} GFLOP/s")

    if "conv" in args.only:
        from peer_msggan import Settings, step_conv_shapes

        settings = Settings.small() if small else Settings()
        shapes = step_conv_shapes(replace(settings, batch=args.batch or settings.batch))
        for dtype in (torch.float32, torch.bfloat16):
            rate = conv_rate(shapes, dtype, reps=1)
            print(
                f"conv fwd+bwd, MSG-GAN step's {len(shapes)} shapes at batch "
                f"{next(iter(shapes)).input[0]}, "
                f"{str(dtype).removeprefix('torch.'):<8} {rate:8.1f} GFLOP/s"
            )

    if "decode" in args.only:
        blobs = sample_png_blobs(200 if small else 2000)
        print(f"PNG decode, 1 core, {len(blobs)} patches: {png_decode_rate(blobs):8.0f} img/s")

    resnet = None
    if "resnet" in args.only or "features" in args.only:
        size = 64 if small else 224
        resnet = resnet18_rate(8 if small else 16, size, seconds)
        gflop = resnet18_flops(size) / 1e9
        print(
            f"bare ResNet18 forward {size} px, random batch: {resnet:8.1f} img/s "
            f"({gflop:.2f} GFLOP/img, {resnet * gflop:.1f} GFLOP/s)"
        )

    if "step" in args.only:
        r = training_step_fraction(small, args.iters, args.batch)
        print(
            f"MSG-GAN step {'(small)' if small else '(paper config, fp32)'}: "
            f"{r['achieved']:.1f} GFLOP/s of a {r['ceiling']:.1f} GFLOP/s conv ceiling of its "
            f"own shapes = {r['achieved'] / r['ceiling']:.0%} (target >= 50%)"
        )

    if "features" in args.only:
        size, n = (64, 16) if small else (224, 64)
        f = feature_pass(n, size, 8 if small else 32)
        print(
            f"feature pass {size} px (FeatureCache.compute): {f['compute']:.1f} img/s = "
            f"{f['compute'] / resnet:.0%} of the bare ResNet18 (target >= 60%); parts alone: "
            f"preprocess {f['preprocess']:.0f} img/s, backbone {f['backbone']:.1f} img/s, "
            f"backbone channels_last + inference_mode {f['backbone_channels_last']:.1f} img/s"
        )

    if "stream" in args.only:
        from ingest_and_stream import measure

        r = measure(patients=4 if small else 10, per_class=25 if small else 50, workers=2)
        per_worker = r["stream"] / r["workers"]
        print(
            f"shard streaming after start-up: {r['stream']:.0f} img/s with {r['workers']} "
            f"workers = {per_worker:.0f} per worker, {per_worker / r['decode_together']:.0%} "
            f"of the decode of {r['workers']} processes at once ({r['decode_together']:.0f} "
            f"img/s each), {per_worker / r['decode']:.0%} of one alone ({r['decode']:.0f}); "
            f"1 worker {r['stream_one_worker']:.0f} img/s = "
            f"{r['stream_one_worker'] / r['decode']:.0%} of one alone (target >= 80%)"
        )


if __name__ == "__main__":
    main()
