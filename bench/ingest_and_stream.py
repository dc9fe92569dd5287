"""Ingest and streaming speed on 20,000 demo patches, against a folder-of-PNGs DataLoader.

    python bench/ingest_and_stream.py [--patients 100 --per-class 100] [--workers 2]

Prints images/s for: the raw single-core PNG decode (the ceiling, bytes already in memory),
`synthbreast ingest`, streaming the shards through a DataLoader, and a plain Dataset that opens
one PNG file per sample (torchvision ImageFolder style), both with the same number of workers
and the same decode to a uint8 tensor. Files are read from the page cache here; on cluster
file systems every file open costs milliseconds, which is what shards avoid.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch
from ceilings import png_decode_rate
from PIL import Image

from synthbreast.config import DemoDataConfig, IngestConfig
from synthbreast.data.demo import write_demo_dataset
from synthbreast.data.ingest import run_ingest
from synthbreast.data.reader import ShardDataset, to_uint8_tensor
from synthbreast.data.shards import load_manifest


class PngFolder(torch.utils.data.Dataset):
    """The baseline: one file open and decode per sample."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as img:
            return {"image": to_uint8_tensor(img.convert("RGB")), "label": i % 2}


def time_loader(loader) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["label"])
    return time.perf_counter() - start, n


def steady_loader(loader) -> dict[str, float]:
    """img/s after the first batch (the workers started and filled), and the start-up: the
    seconds to that first batch (forking the workers, their first shard)."""
    start = time.perf_counter()
    batches = iter(loader)
    first = len(next(batches)["label"])
    started = time.perf_counter()
    n = sum(len(batch["label"]) for batch in batches)
    return {"rate": n / (time.perf_counter() - started), "startup": started - start,
            "images": first + n}  # fmt: skip


def concurrent_decode_rate(blobs: list[bytes], processes: int) -> float:
    """Per-process decode img/s with `processes` decoding at once: what each of that many
    DataLoader workers could reach. Cores that share a physical core or its caches (as a VM's
    do) give each less than one alone: the per-worker ceiling of a loader with that many."""
    if processes <= 1:
        return png_decode_rate(blobs)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes) as pool:
        rates = pool.map(png_decode_rate, [blobs] * processes)
    return sum(rates) / processes


def measure(
    patients: int = 100,
    per_class: int = 100,
    workers: int = 2,
    batch: int = 64,
    work: Path | None = None,
) -> dict[str, float]:
    """img/s of the decode ceiling, ingest, shard streaming and a folder of PNGs."""
    work = work or Path(tempfile.mkdtemp(prefix="synthbreast-bench-"))
    demo, shards = work / "demo", work / "shards"
    if not demo.exists():
        start = time.perf_counter()
        write_demo_dataset(DemoDataConfig(str(demo), patients, per_class, seed=0))
        print(f"demo data: {time.perf_counter() - start:.1f} s", flush=True)
    files = sorted(demo.rglob("*.png"))
    n = len(files)

    # 1. The ceiling: decode only, bytes already in memory; one process alone, and each of
    # `workers` processes decoding at once (the per-worker ceiling of a loader with that many).
    blobs = [p.read_bytes() for p in files]
    decode_rate = png_decode_rate(blobs)
    decode_together = concurrent_decode_rate(blobs, workers)

    # 2. Ingest (check every image in `workers` processes, then write shards).
    manifest = run_ingest(
        IngestConfig(src=str(demo), out=str(shards), workers=workers, overwrite=True)
    )
    ingest_rate = manifest["totals"]["images"] / manifest["seconds"]

    # 3. Streaming the shards vs 4. one PNG file per sample, same workers and batch.
    names = [s["name"] for s in load_manifest(shards)["shards"]]
    stream = ShardDataset([shards / name for name in names], shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers)
    folder = torch.utils.data.DataLoader(
        PngFolder(files), batch_size=batch, num_workers=workers, shuffle=True
    )
    time_loader(loader)  # warm the page cache for both, equally
    stream = steady_loader(loader)
    one = steady_loader(torch.utils.data.DataLoader(loader.dataset, batch_size=batch,
                                                    num_workers=1))  # fmt: skip
    folder_s, folder_n = time_loader(folder)
    assert stream["images"] == one["images"] == folder_n == n, (stream, one, folder_n, n)
    return {
        "images": n,
        "workers": workers,
        "batch": batch,
        "decode": decode_rate,
        "decode_together": decode_together,
        "ingest": ingest_rate,
        "stream": stream["rate"],
        "stream_startup": stream["startup"],
        "stream_one_worker": one["rate"],
        "folder": n / folder_s,
        "work": str(work),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    r = measure(args.patients, args.per_class, args.workers, args.batch, args.dir)
    n, decode_rate, stream_rate, folder_rate = r["images"], r["decode"], r["stream"], r["folder"]

    w, together, one = args.workers, r["decode_together"], r["stream_one_worker"]
    print(f"\n{n:,} patches of 50x50, {w} workers, batch {args.batch}")
    rows = [
        ("raw PNG decode, 1 process alone", decode_rate),
        (f"raw PNG decode, each of {w} at once (ceiling per worker)", together),
        ("synthbreast ingest (check + write shards)", r["ingest"]),
        (f"shard streaming, {w} workers, after start-up", stream_rate),
        ("shard streaming, 1 worker, after start-up", one),
        ("folder of PNGs (one open per sample), whole run", folder_rate),
    ]
    print(f"{'what':<58}{'img/s':>10}")
    for what, rate in rows:
        print(f"{what:<58}{rate:>10,.0f}")
    print(f"start-up of the {w}-worker loader (fork, first shard): {r['stream_startup']:.2f} s")
    print(f"streaming / folder loader: {stream_rate / folder_rate:.2f}x")
    print(
        f"streaming per worker: {stream_rate / w / together:.0%} of the ceiling of {w} decoding "
        f"at once ({stream_rate / w / decode_rate:.0%} of one decoding alone); 1 worker: "
        f"{one / decode_rate:.0%} of one alone (target >= 80%)"
    )
    print(f"work folder: {r['work']}")


if __name__ == "__main__":
    main()
