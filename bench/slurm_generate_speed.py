"""Time `slurm/generate.sh` as Slurm array jobs of 1 and 2 tasks on the local one-node cluster
of the tests (tests/slurm_cluster.py; run as root, it installs slurm-wlm and munge when
missing), on a random-init checkpoint, one CPU and one thread per task.

Prints, per array: each task's time from its StartTime to its EndTime (1 s resolution, so give
it tens of seconds of work), the array's span from the first start to the last end, img/s
over the span, the scaling efficiency against the 1-task array, and whether the shards have the
same bytes in every array.

    python bench/slurm_generate_speed.py                          # width 0.125, 4 x 2000 images
    python bench/slurm_generate_speed.py --tasks 1 2 4 --per-shard 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ceilings import machine_line  # noqa: E402  (bench/, beside this file)
from generate_speed import make_checkpoint  # noqa: E402

from synthbreast.data.shards import load_manifest, verify_shards  # noqa: E402
from tests.slurm_cluster import SlurmCluster, ensure_slurm_installed  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, default=0.125, help="channel multiplier")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--latent", type=int, default=512)
    parser.add_argument("--shards", type=int, default=4, help="divisible by every --tasks")
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--output-size", type=int, default=50)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2])
    return parser.parse_args()


def wait_array(
    cluster: SlurmCluster, job: str, logs: Path, pattern: str
) -> tuple[list[float], float]:
    """Wait for array `job`; exit with the tasks' logs (LOGS/PATTERN) unless every task
    COMPLETED. Returns each task's seconds from StartTime to EndTime and the span from the
    first start to the last end (Slurm's 1 s steps)."""
    records = cluster.wait(job, timeout=3600)
    if any(r["JobState"] != "COMPLETED" for r in records):
        text = "\n".join(p.read_text()[-1500:] for p in sorted(logs.glob(pattern)))
        sys.exit(f"array {job} did not complete: {records}\n{text}")
    starts = [datetime.fromisoformat(r["StartTime"]) for r in records]
    ends = [datetime.fromisoformat(r["EndTime"]) for r in records]
    task_s = [(e - s).total_seconds() for s, e in zip(starts, ends, strict=True)]
    return task_s, (max(ends) - min(starts)).total_seconds()


def run_array(cluster: SlurmCluster, tasks: int, checkpoint: Path, out: Path, args) -> dict:
    env = {
        "CHECKPOINT": str(checkpoint),
        "OUT": str(out),
        "SHARDS": str(args.shards),
        "PER_SHARD": str(args.per_shard),
        "OUTPUT_SIZE": str(args.output_size),
        "OMP_NUM_THREADS": "1",
    }
    started = time.perf_counter()
    job = cluster.sbatch(
        f"--array=0-{tasks - 1}",
        "--gres=none",
        "--cpus-per-task=1",
        "--mem=2G",
        f"--output={out.parent}/{out.name}-%A_%a.log",
        str(REPO / "slurm" / "generate.sh"),
        env=env,
        cwd=out.parent,
    )
    task_s, span = wait_array(cluster, job, out.parent, f"{out.name}-*.log")
    wall = time.perf_counter() - started
    images = args.shards * args.per_shard
    return {
        "tasks": len(task_s),
        "task_s": task_s,
        "span_s": span,
        "wall_s": wall,
        "img_s": images / span,
        "verified": not verify_shards(out, load_manifest(out)),
    }


def main() -> None:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("the local Slurm cluster runs its daemons and jobs as root: run this as root")
    if any(args.shards % t for t in args.tasks):
        sys.exit(f"--shards {args.shards} must be divisible by every --tasks {args.tasks}")
    ensure_slurm_installed()
    with tempfile.TemporaryDirectory(prefix="slurm-", dir="/tmp") as tmp:
        root = Path(tmp)
        checkpoint = make_checkpoint(root / "run", args)
        cluster = SlurmCluster(root / "cluster")
        (root / "cluster").mkdir()
        print(
            f"MSG-GAN G width {args.width}, {args.resolution} px -> {args.output_size} px PNG, "
            f"{args.shards} shards x {args.per_shard}; slurm/generate.sh, 1 CPU and 1 thread "
            "per task"
        )
        print(machine_line())
        results, outs = [], []
        try:
            cluster.start()
            for tasks in args.tasks:
                out = root / f"out-{tasks}"
                r = run_array(cluster, tasks, checkpoint, out, args)
                results.append(r)
                outs.append(out)
                print(
                    f"{r['tasks']} task(s): {r['img_s']:7.1f} img/s over the span of "
                    f"{r['span_s']:.0f} s (tasks {', '.join(f'{s:.0f}' for s in r['task_s'])} s; "
                    f"{r['wall_s']:.0f} s from sbatch to the last end), verified={r['verified']}"
                )
        finally:
            cluster.stop()
        names = sorted(p.name for p in outs[0].glob("*.tar"))
        same = all((a / n).read_bytes() == (outs[0] / n).read_bytes() for a in outs for n in names)
        print(f"shards identical across arrays: {same}")
        one = next((r for r in results if r["tasks"] == 1), None)
        for r in results:
            if one and r["tasks"] > 1:
                efficiency = r["img_s"] / (r["tasks"] * one["img_s"])
                print(f"scaling efficiency at {r['tasks']} array tasks: {efficiency:.2f}")


if __name__ == "__main__":
    main()
