"""Time `synthbreast generate` end to end (G_ema forward, PNG encoding, shard writing) at 1 and
at 2 processes (torchrun), on a random-init checkpoint made in a temporary folder.

Prints images/s per setting (default: 1 process with torch's default threads, 1 process with
1 thread, 2 processes): the generation phase (after torch import and checkpoint load) and
the whole wall time including process start. Also checks that the shards made by 1 process
(torch's default threads) and by 2 (torchrun sets 1 thread each) have the same bytes.

    python bench/generate_speed.py                              # width 0.125, 64 px, CPU demo
    python bench/generate_speed.py --width 1 --shards 4 --per-shard 200   # the paper's G
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from synthbreast.config import GenerateConfig
from synthbreast.data.shards import load_manifest, verify_shards
from synthbreast.generate import run_generate
from synthbreast.models.msggan import Generator, MSGGANConfig
from synthbreast.train.checkpoint import save_checkpoint

RESULT = "BENCH-RESULT "  # prefix of each rank's summary line


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, default=0.125, help="channel multiplier")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--latent", type=int, default=512)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--output-size", type=int, default=50, help="50 = real IDC patches")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["1", "1:1", "2"],
        help="P (P processes; torchrun gives each 1 thread) or P:T (OMP_NUM_THREADS=T)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args()


def make_checkpoint(run_dir: Path, args: argparse.Namespace) -> Path:
    torch.manual_seed(0)
    model = MSGGANConfig(resolution=args.resolution, latent_dim=args.latent, width=args.width)
    G = Generator(model)
    state = {
        "config": {"class_label": 1, "resolution": args.resolution, "width": args.width},
        "model": model.to_dict(),
        "G_ema": G.state_dict(),
        "kimg": 0.0,
        "step": 0,
    }
    save_checkpoint(run_dir, 0, state)
    return run_dir


def job(args: argparse.Namespace, checkpoint: str, out: str) -> GenerateConfig:
    return GenerateConfig(
        checkpoint=checkpoint,
        out=out,
        shards=args.shards,
        per_shard=args.per_shard,
        batch_size=args.batch_size,
        output_size=args.output_size,
    )


def worker(args: argparse.Namespace) -> None:
    """One rank: make its shards, print its summary as one JSON line."""
    summary = run_generate(job(args, *args.worker))
    summary["threads"] = torch.get_num_threads()
    print(RESULT + json.dumps(summary), flush=True)


def launch_ranks(script: list[str], setting: str) -> tuple[list[dict], float]:
    """Run `python SCRIPT...` as setting P (P torchrun processes) or P:T (OMP_NUM_THREADS=T);
    returns each rank's RESULT line (parsed) and the wall seconds, process start-up included."""
    processes_text, _, threads = setting.partition(":")
    processes = int(processes_text)
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(processes)]
    command += script
    split = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
    env = {k: v for k, v in os.environ.items() if k not in split}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    ranks = [
        json.loads(line[len(RESULT) :])
        for line in done.stdout.splitlines()
        if line.startswith(RESULT)
    ]
    return ranks, wall


def launch(args: argparse.Namespace, setting: str, checkpoint: Path, out: Path) -> dict:
    script = [__file__, "--worker", str(checkpoint), str(out)]
    for name in ("width", "resolution", "latent", "shards", "per_shard", "batch_size"):
        script += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    script += ["--output-size", str(args.output_size)]
    ranks, wall = launch_ranks(script, setting)
    images = sum(r["images"] for r in ranks)
    problems = verify_shards(out, load_manifest(out))
    return {
        "processes": len(ranks),
        "threads": sorted({r["threads"] for r in ranks}),
        "images": images,
        # ranks start together; the slowest one decides when the job is done
        "pass_img_s": images / max(r["seconds"] for r in ranks),
        "wall_img_s": images / wall,
        "wall_s": wall,
        "verified": not problems,
    }


def print_scaling(results: list[dict], doing: str) -> None:
    """Print the scaling efficiency of each multi-process result (N one-thread processes
    against N times one one-thread process) and, past one process per core, the fraction of
    the one-per-core rate, which is the ceiling there. Each result has processes, threads
    (the sorted thread counts of its ranks), pass_img_s (the rate of the work itself, named
    by `doing`) and wall_img_s (start-up included)."""
    one = next((r for r in results if r["processes"] == 1 and r["threads"] == [1]), None)
    for r in results:
        if one and r["processes"] > 1 and r["threads"] == [1]:
            n = r["processes"]
            print(
                f"scaling efficiency at {n} processes: "
                f"{r['pass_img_s'] / (n * one['pass_img_s']):.2f} {doing}, "
                f"{r['wall_img_s'] / (n * one['wall_img_s']):.2f} with start-up"
            )
    cores = os.cpu_count() or 1
    per_core = next((r for r in results if r["processes"] == cores), None)
    for r in results:
        if per_core and r["processes"] > cores:
            print(
                f"{r['processes']} processes on {cores} cores: "
                f"{r['pass_img_s'] / per_core['pass_img_s']:.2f} of the {cores}-process rate "
                "(the ceiling with one process per core)"
            )


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "run", args)
        print(
            f"MSG-GAN G width {args.width}, {args.resolution} px -> {args.output_size} px PNG, "
            f"{args.shards} shards x {args.per_shard}, batch {args.batch_size}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}"
        )
        outs, results = {}, []
        for setting in args.settings:
            out = Path(tmp) / f"out-{setting.replace(':', 'x')}"
            r = launch(args, setting, checkpoint, out)
            outs[setting] = out
            results.append(r)
            print(
                f"{r['processes']} process(es) x {r['threads']} thread(s): "
                f"{r['pass_img_s']:8.1f} img/s generating, {r['wall_img_s']:8.1f} img/s "
                f"with start-up ({r['images']} images in {r['wall_s']:.1f} s), "
                f"verified={r['verified']}"
            )
        names = sorted(p.name for p in next(iter(outs.values())).glob("*.tar"))
        same = all(
            (a / n).read_bytes() == (b / n).read_bytes()
            for n in names
            for a in outs.values()
            for b in outs.values()
        )
        print(f"shards identical across settings: {same}")
        print_scaling(results, "generating")


if __name__ == "__main__":
    main()
