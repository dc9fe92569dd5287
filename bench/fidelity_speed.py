"""Speed of the fidelity stage: features/s per extractor and the nearest-neighbour search.

Extractors run on random 50 x 50 RGB patches (the IDC size), as `synthbreast fidelity` runs
them: `prepare` per image (PIL, as in a DataLoader worker, here in the main process) then the
network on batches. `classifier` is a random-init ResNet18 (the speed does not depend on the
weights) at the native 50 px and at 224 px; `inception` uses the torch hub file when present,
else random weights (said in the output). Then the blocked nearest-neighbour search of
memorisation (|x|^2 - 2 x.y + |y|^2 in blocks) for 38,000 synthetic x 40,000 training items
(the paper's 38,000 per class against a GAN pool of that order) at 512-d (ResNet18) and 2048-d
(Inception), float32.

    python bench/fidelity_speed.py                       # CPU (or the GPU when present)
    python bench/fidelity_speed.py --queries 5000 --references 5000 --device cpu
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torchvision
from PIL import Image

from synthbreast.eval.features import (
    Extractor,
    classifier_from_model,
    inception_extractor,
    inception_from_network,
    inception_network,
    inception_weights_path,
    pixels_extractor,
)
from synthbreast.eval.memorisation import nearest_neighbours


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per extractor (about)")
    parser.add_argument("--queries", type=int, default=38_000)
    parser.add_argument("--references", type=int, default=40_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    return parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def features_per_second(
    extractor: Extractor, device: torch.device, batch_size: int, seconds: float
) -> tuple[float, float]:
    """(features/s with prepare, features/s of the network alone) on random 50 px patches."""
    rng = np.random.default_rng(0)
    patches = [
        Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
        for _ in range(batch_size)
    ]
    extractor.to(device)
    batch = torch.stack([extractor.prepare(p) for p in patches]).to(device)
    extractor(batch)  # warm up (cudnn, allocator)
    sync(device)
    count, prepare_s, network_s = 0, 0.0, 0.0
    while prepare_s + network_s < seconds:
        began = time.perf_counter()
        batch = torch.stack([extractor.prepare(p) for p in patches]).to(device)
        prepared = time.perf_counter()
        extractor(batch)
        sync(device)
        prepare_s += prepared - began
        network_s += time.perf_counter() - prepared
        count += batch_size
    return count / (prepare_s + network_s), count / network_s


def main() -> None:
    args = parse_args()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({where}), torch threads: {torch.get_num_threads()}")

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=2)
    extractors = [
        ("pixels 16x16x3", pixels_extractor(16)),
        (
            "classifier resnet18, native 50 px (random weights)",
            classifier_from_model(resnet, None, {}),
        ),
        ("classifier resnet18, 224 px (random weights)", classifier_from_model(resnet, 224, {})),
    ]
    if inception_weights_path().is_file():
        extractors.append(("inception 299 px (torchvision weights)", inception_extractor()))
    else:
        print(f"inception: no weights at {inception_weights_path()}: random weights (same speed)")
        extractors.append(
            ("inception 299 px (random weights)", inception_from_network(inception_network(), {}))
        )
    print(f"\nfeatures/s, batch {args.batch_size} ({'with prepare':>12} | network only)")
    for name, extractor in extractors:
        with torch.inference_mode():
            total, network = features_per_second(extractor, device, args.batch_size, args.seconds)
        print(f"  {name:<52} {total:>10,.0f} | {network:,.0f}")

    print(f"\nnearest neighbour, {args.queries:,} x {args.references:,} (float32, blocked)")
    gen = torch.Generator().manual_seed(0)
    for dim in args.dims:
        queries = torch.randn(args.queries, dim, generator=gen).to(device)
        references = torch.randn(args.references, dim, generator=gen).to(device)
        nearest_neighbours(queries[:256], references[:4096], device=device)  # warm up
        sync(device)
        began = time.perf_counter()
        nearest_neighbours(queries, references, k=1, device=device)
        sync(device)
        seconds = time.perf_counter() - began
        tflop = 2 * args.queries * args.references * dim / 1e12
        print(f"  {dim:>5}-d: {seconds:8.2f} s  ({tflop / seconds * 1e3:,.0f} GFLOP/s of products)")


if __name__ == "__main__":
    main()
