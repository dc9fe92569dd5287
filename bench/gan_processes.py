"""Training img/s of the `small` budget's conditional model at 1 process and at N torchrun
ranks, alternated over rounds, at the same global batch (so the same arithmetic per image).

Each setting is P:T, P processes of T threads each (OMP_NUM_THREADS=T; P > 1 runs under
`torch.distributed.run --standalone`). The figure is the mean img/s of the run's ticks after
the first (stats.jsonl), as `bench/gan_budget_step.py` reports it; the last column is the
ratio to the first setting.

    python bench/gan_processes.py --shards SHARDS                  # 1:2 against 2:1
    python bench/gan_processes.py --shards SHARDS --settings 1:2 2:1 --kimg 0.8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def img_per_s(shards: Path, setting: str, kimg: float, outdir: Path) -> float:
    processes, _, threads = setting.partition(":")
    command = [sys.executable]
    if int(processes) > 1:
        command += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", processes]
    command += ["-m", "synthbreast", "train-gan", str(shards), "--outdir", str(outdir)]
    command += ["--budget", "small", "--model", "msggan-cond", "--kimg", str(kimg)]
    command += ["--tick-kimg", str(kimg / 5), "--snapshot-kimg", str(kimg)]
    command += ["--checkpoint-kimg", str(kimg), "--metric-images", "0", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": threads or "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    (stats,) = outdir.glob("*/stats.jsonl")
    ticks = [json.loads(line) for line in stats.read_text().splitlines()]
    return statistics.mean(t["img_per_s"] for t in ticks[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--settings", nargs="+", default=["1:2", "2:1"], help="P:T each")
    parser.add_argument("--kimg", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    found: dict[str, list[float]] = {s: [] for s in args.settings}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for setting in args.settings:
                outdir = Path(tmp) / f"{round_}-{setting.replace(':', 'x')}"
                found[setting].append(img_per_s(args.shards, setting, args.kimg, outdir))
                print(f"  round {round_}: {setting}: {found[setting][-1]:.1f} img/s", flush=True)
    first = statistics.mean(found[args.settings[0]])
    print(f"{'processes:threads':<20}{'img/s per round':<24}{'mean':>8}{'vs first':>10}")
    for setting, values in found.items():
        rounds = " ".join(f"{v:6.1f}" for v in values)
        mean = statistics.mean(values)
        print(f"{setting:<20}{rounds:<24}{mean:8.1f}{mean / first:9.2f}x")


if __name__ == "__main__":
    main()
