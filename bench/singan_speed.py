"""SinGAN training time per scale and per image, on one real image, for a budget.

    python bench/singan_speed.py --budget small --mias mdb023 --out /tmp/singan-small
    python bench/singan_speed.py --budget tiny --image some.png --side 48
    python bench/singan_speed.py --budget paper --mias mdb023 --side 250 --iterations 20

--mias REF: a crop of side 2 x --side around the first lesion of that mini-MIAS image (Info.txt's
y counts from the bottom), shrunk to --side; --image: any PNG/PGM, centre-cropped square and
shrunk to --side. Prints one line per scale (size, seconds, reconstruction error) and the total;
writes OUT/models/<name>/ (the model as train-singan writes it) and OUT/grid.png (source,
reconstruction, 16 variants). With --iterations below the budget's, it also prints the time the
budget's full iteration count would take, from the measured per-scale times.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import torch
from PIL import Image

from synthbreast.config import TrainSinGANConfig
from synthbreast.train.singan import (
    apply_budget,
    image_tensor,
    load_model,
    train_model,
    write_grid,
)

MIAS = Path(__file__).resolve().parents[2] / "shared" / "real-sample" / "mias"


def mias_crop(ref: str, side: int, context: float = 2.0) -> tuple[Image.Image, str]:
    for line in (MIAS / "Info.txt").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == ref and len(parts) >= 7 and parts[4].isdigit():
            x, y = int(parts[4]), int(parts[5])
            image = Image.open(MIAS / f"{ref}.pgm")
            y = image.height - y  # Info.txt counts y from the bottom
            half = round(side * context / 2)
            box = (x - half, y - half, x + half, y + half)
            crop = image.crop(box).resize((side, side), Image.BICUBIC)
            return crop, f"{ref} {parts[2]} {parts[3]} at ({x}, {y}) box {box}"
    raise SystemExit(f"{ref}: no lesion with coordinates in {MIAS / 'Info.txt'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="small", choices=("tiny", "small", "paper"))
    parser.add_argument("--mias", help="a mini-MIAS ref with a lesion, e.g. mdb023")
    parser.add_argument("--image", help="an image file instead")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--context", type=float, default=2.0, help="--mias crop / --side")
    parser.add_argument("--iterations", type=int, help="override the budget's per scale")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/singan-bench")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.mias:
        image, what = mias_crop(args.mias, args.side, args.context)
        channels = 1
    elif args.image:
        image = Image.open(args.image)
        s = min(image.size)
        left, top = (image.width - s) // 2, (image.height - s) // 2
        image = image.crop((left, top, left + s, top + s)).resize((args.side, args.side))
        channels = 1 if image.mode in ("L", "I;16", "I") else 3
        what = args.image
    else:
        raise SystemExit("give --mias REF or --image FILE")
    buffer = io.BytesIO()
    image.convert("L" if channels == 1 else "RGB").save(buffer, format="PNG")
    tensor = image_tensor(buffer.getvalue(), channels)

    config = apply_budget(TrainSinGANConfig(shards="-", class_label=0, seed=args.seed), args.budget)
    budget_iterations = config.iterations
    if args.iterations:
        config.iterations = args.iterations
    out = Path(args.out)
    model_dir = out / "models" / (args.mias or Path(args.image).stem)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "source.png").write_bytes(buffer.getvalue())
    device = torch.device(args.device)
    print(
        f"{what}: {tuple(tensor.shape)}, budget {args.budget}, {torch.get_num_threads()} "
        f"thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    started = time.perf_counter()
    summary = train_model(config, tensor, model_dir, device, say=lambda *a, **k: None)
    total = time.perf_counter() - started
    for s in summary["scales"]:
        h, w = s["size"]
        print(
            f"scale {s['scale']}: {h}x{w}  {s['seconds']:7.1f} s wall  "
            f"{s.get('cpu_seconds', float('nan')):7.1f} s CPU  "
            f"rec_mse {s['last'].get('rec_mse', float('nan')):.4f}"
        )
    cpu = summary.get("cpu_seconds", float("nan"))
    print(
        f"total {total:.1f} s wall ({total / 60:.1f} min), {cpu:.1f} s CPU ({cpu / 60:.1f} min) "
        f"for {len(summary['scales'])} scales x {config.iterations} iterations; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    if config.iterations != budget_iterations:
        # the time of a scale is linear in its iterations (each the same d and g steps on the
        # same sizes), so a short run times the full budget on this machine
        factor = budget_iterations / config.iterations
        print(
            f"the {args.budget} budget's {budget_iterations} iterations per scale, from these "
            f"{config.iterations}: about {total * factor / 60:.0f} min wall, "
            f"{cpu * factor / 60:.0f} min CPU per image (x{factor:.0f} the time of each scale)"
        )
    (model_dir / "model.json").write_text(json.dumps({**summary, "channels": channels}, indent=2))
    G = load_model(model_dir)[0]
    write_grid(G, tensor, out / "grid.png", seed=args.seed)
    print(f"grid: {out / 'grid.png'}")


if __name__ == "__main__":
    main()
