"""Time the two frozen-ResNet training paths of `synthbreast classify` on the same images, and
project the paper's protocol (53,200 training images x 150 epochs) for each.

- plain: every step runs the batch through the whole ResNet18 (backbone in eval mode, no grad
  into it) and trains the fc: `fit(model, ...)` with the real preprocessing.
- cached: each image through the backbone once (`FeatureCache.compute`), then the fc trains on
  the features for every epoch: `fit(model.fc, ...)`.

Both use the functions `run_classify` uses. Images are random uint8 patches of the real size
(50 px; speed does not depend on content), resized to --sizes (224 = the paper, native = 50).

    python bench/classify_speed.py                     # CPU, about 1-2 minutes
    python bench/classify_speed.py --images 2048 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from synthbreast.config import ClassifyConfig
from synthbreast.eval.classify import FeatureCache, fit, parse_input_size, preprocess, threads
from synthbreast.models.classifier import build_classifier, set_trainable, train_mode

PAPER_IMAGES, PAPER_EPOCHS = 53_200, 150


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["native", "224"])
    parser.add_argument("--images", type=int, default=None, help="images per size [128; 64 at 224]")
    parser.add_argument("--head-epochs", type=int, default=20, help="fc epochs on the features")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--feature-batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def timed(work) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


def bench_size(args: argparse.Namespace, size_text: str) -> dict[str, float]:
    device = torch.device(args.device)
    size = parse_input_size(size_text)
    n = args.images or (64 if size and size >= 128 else 128)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 50, 50), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    torch.manual_seed(0)
    model = build_classifier("resnet18").to(device)
    parameters = set_trainable(model, "frozen")
    one_epoch = ClassifyConfig(out="unused", epochs=1, batch_size=args.batch_size)

    # warm-up: first calls pick kernels and allocate
    with torch.no_grad():
        model.eval()(preprocess(images[: args.batch_size], size, device))

    # plain: one epoch of the whole ResNet per step
    train_mode(model, "frozen")
    plain_s = timed(
        lambda: fit(
            model, parameters, images, labels, lambda x: preprocess(x, size, device),
            one_epoch, device,
        )
    )  # fmt: skip

    # cached: the backbone once per image, then fc epochs on the features
    cache = FeatureCache(
        "unused", model, "resnet18", size, device, args.feature_batch_size
    )  # only .compute is used: nothing is written
    features = None

    def extract() -> None:
        nonlocal features
        features = cache.compute(images).to(device)

    extract_s = timed(extract)
    head_config = ClassifyConfig(out="unused", epochs=args.head_epochs, batch_size=args.batch_size)
    with threads(1 if device.type == "cpu" else None):  # as run_classify does
        head_s = timed(
            lambda: fit(
                model.fc, list(model.fc.parameters()), features, labels, lambda x: x,
                head_config, device,
            )
        )  # fmt: skip
    return {
        "images": n,
        "plain": n / plain_s,
        "extract": n / extract_s,
        "head": n * args.head_epochs / head_s,
    }


def main() -> None:
    args = parse_args()
    print(
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch_size}; frozen ResNet18, random init (speed is the same as ImageNet's)"
    )
    header = (
        f"{'input':>7} {'images':>6} | {'plain img/s':>11} | {'features img/s':>14} "
        f"{'fc-only img/s':>13} | {'paper, plain':>13} {'paper, cached':>14} {'speed-up':>8}"
    )
    print(header)
    print("-" * len(header))
    for size_text in args.sizes:
        r = bench_size(args, size_text)
        total = PAPER_IMAGES * PAPER_EPOCHS
        plain = total / r["plain"]
        cached = PAPER_IMAGES / r["extract"] + total / r["head"]
        label = f"{size_text}px" if size_text != "native" else "50px"
        print(
            f"{label:>7} {r['images']:>6} | {r['plain']:>11,.1f} | {r['extract']:>14,.1f} "
            f"{r['head']:>13,.0f} | {hours(plain):>13} {hours(cached):>14} "
            f"{plain / cached:>7,.0f}x",
            flush=True,
        )
    print(
        f"paper = {PAPER_IMAGES:,} training images x {PAPER_EPOCHS} epochs; cached = features "
        "once + fc epochs (test-set prediction, the same in both, not counted)"
    )


if __name__ == "__main__":
    main()
