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

from gan_budget_step import alternate  # bench/, beside this file


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
    with tempfile.TemporaryDirectory() as tmp:

        def measure(setting: str, round_index: int, _: int) -> float:
            outdir = Path(tmp) / f"{round_index}-{setting.replace(':', 'x')}"
            return img_per_s(args.shards, setting, args.kimg, outdir)

        alternate(args.settings, args.rounds, measure, "processes:threads", 20)


if __name__ == "__main__":
    main()
