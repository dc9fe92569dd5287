"""Time a feature pass, the classifier's (`classify --features-only`) or fidelity's (`fidelity
--features-only`, `--command fidelity`), at 1, 2 and 4 processes (torchrun) and as Slurm arrays
of 1 and 2 tasks (slurm/classify.sh or slurm/run.sh on the tests' local cluster, as root), on
demo shards made in a temporary folder, and print the scaling efficiency.

Each setting fills its own cache from nothing. Printed per setting: images/s of the pass
itself (from each process's own timing after its backbone is built; the slowest process decides)
and over the whole wall time with process start-up; for the arrays, over the span from the
first task's start to the last one's end (Slurm's 1 s resolution). Efficiency at N = the N-way
rate / (N x the 1-process, 1-thread rate). Checks that every setting's cache equals the
1-process one.

    python bench/feature_speed.py                                   # ResNet18, 224 px
    python bench/feature_speed.py --settings 1:1 1:2 2 4 --slurm-tasks 1 2
    python bench/feature_speed.py --backbone efficientnet-lite0 --input-size 128 --slurm-tasks
    python bench/feature_speed.py --command fidelity --extractors inception --patients 6 \
        --per-class 20                          # every pool and a small synthetic set
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from ceilings import machine_line  # noqa: E402  (bench/, beside this file)
from generate_speed import RESULT, launch_ranks, print_scaling  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from synthbreast.config import (  # noqa: E402
    ClassifyConfig,
    DemoDataConfig,
    FidelityConfig,
    IngestConfig,
    save_config,
)
from synthbreast.data.demo import write_demo_dataset  # noqa: E402
from synthbreast.data.ingest import run_ingest  # noqa: E402
from synthbreast.eval import classify, fidelity  # noqa: E402

# per command: its config, its feature pass, and the Slurm script that runs it as an array
COMMANDS = {
    "classify": (ClassifyConfig, classify.precompute_features, "classify.sh"),
    "fidelity": (FidelityConfig, fidelity.precompute_features, "run.sh"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--command", choices=sorted(COMMANDS), default="classify")
    parser.add_argument(
        "--extractors", nargs="+", default=["inception"], help="fidelity's (--command fidelity)"
    )
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--per-class", type=int, default=40, help="demo patches per class")
    parser.add_argument("--shard-size", type=int, default=40)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="none", help="the speed is the same with imagenet")
    parser.add_argument("--input-size", default="224")
    parser.add_argument(
        "--settings", nargs="+", default=["1:1", "2", "4"],
        help="P (P torchrun processes, 1 thread each) or P:T (OMP_NUM_THREADS=T)",
    )  # fmt: skip
    parser.add_argument(
        "--slurm-tasks", type=int, nargs="*", default=[1, 2],
        help="array sizes on the local Slurm cluster (root only); none: skip",
    )  # fmt: skip
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    return parser.parse_args()


def make_job(root: Path, args: argparse.Namespace) -> Path:
    """Demo shards and the config of a feature pass: classify's of the real-real scenario, or
    fidelity's of every pool compared and a small synthetic set (an untrained tiny G's)."""
    demo = root / "demo"
    write_demo_dataset(DemoDataConfig(str(demo), args.patients, args.per_class, seed=0))
    shards = root / "shards"
    run_ingest(IngestConfig(src=str(demo), out=str(shards), shard_size=args.shard_size))
    if args.command == "classify":
        config = ClassifyConfig(
            out=str(root / "unused"), real=str(shards), scenario="real-real",
            backbone=args.backbone, weights=args.weights, input_size=args.input_size,
            features_only=True, device="cpu",
        )  # fmt: skip
    else:
        from tests.test_scenarios import make_synthetic

        synthetic = make_synthetic(root / "synthetic-run")
        config = FidelityConfig(
            real=str(shards), synthetic=[str(synthetic)], out=str(root / "unused"),
            extractors=args.extractors, features_only=True, device="cpu", workers=1,
        )  # fmt: skip
    save_config(config, root / "job.json")
    return root / "job.json"


def worker(args: argparse.Namespace) -> None:
    from synthbreast.config import load_config

    kind, precompute, _ = COMMANDS[command_of(Path(args.worker))]
    summary = precompute(load_config(args.worker, kind), env=os.environ)
    summary["threads"] = torch.get_num_threads()
    print(RESULT + json.dumps(summary), flush=True)


def command_of(config: Path) -> str:
    job = json.loads(config.read_text())["job"]
    return next(name for name, (kind, _, _) in COMMANDS.items() if kind.__name__ == job)


def job_for(config: Path, cache: Path) -> Path:
    """The same job with its own cache folder (classify: the cache; fidelity: OUT/features)."""
    data = json.loads(config.read_text())
    data["feature_cache" if command_of(config) == "classify" else "out"] = str(cache)
    path = cache.parent / f"{cache.name}.json"
    path.write_text(json.dumps(data))
    return path


def launch(setting: str, config: Path, cache: Path) -> dict:
    ranks, wall = launch_ranks([__file__, "--worker", str(job_for(config, cache))], setting)
    images = sum(r["images"] for r in ranks)
    return {
        "label": f"{len(ranks)} process(es) x {sorted({r['threads'] for r in ranks})} thread(s)",
        "processes": len(ranks),
        "threads": sorted({r["threads"] for r in ranks}),
        "images": images,
        "pass_img_s": images / max(r["compute_seconds"] for r in ranks),
        "wall_img_s": images / wall,
        "wall_s": wall,
    }


def run_arrays(tasks_list: list[int], config: Path, root: Path) -> list[tuple[dict, Path]]:
    from slurm_generate_speed import wait_array

    from tests.slurm_cluster import SlurmCluster, ensure_slurm_installed

    ensure_slurm_installed()
    cluster = SlurmCluster(root / "cluster")
    (root / "cluster").mkdir()
    found = []
    try:
        cluster.start()
        for tasks in tasks_list:
            cache = root / f"slurm-{tasks}"
            job_file = str(job_for(config, cache))
            command = command_of(config)
            script = COMMANDS[command][2]
            # classify.sh takes the config from CONFIG; run.sh its command line
            args = [] if command == "classify" else [command, "--config", job_file]
            job = cluster.sbatch(
                f"--array=0-{tasks - 1}", "--gres=none", "--cpus-per-task=1", "--mem=4G",
                f"--output={root}/slurm-{tasks}-%A_%a.log", str(REPO / "slurm" / script),
                *args,
                env={"CONFIG": job_file, "FEATURES_ONLY": "1", "OMP_NUM_THREADS": "1"},
                cwd=root,
            )  # fmt: skip
            task_s, span = wait_array(cluster, job, root, f"slurm-{tasks}-*.log")
            images = cache_images(cache)
            found.append(({"tasks": len(task_s), "span_s": span, "images": images,
                           "img_s": images / span}, cache))  # fmt: skip
    finally:
        cluster.stop()
    return found


def cache_files(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every cached shard's tensors (classify: CACHE/*/; fidelity: OUT/features/*/)."""
    return {str(p.relative_to(cache)): load_file(p) for p in cache.rglob("*.safetensors")}


def cache_images(cache: Path) -> int:
    return sum(len(t["labels"]) for t in cache_files(cache).values())


def same_cache(a: Path, b: Path) -> bool:
    x, y = cache_files(a), cache_files(b)
    return sorted(x) == sorted(y) and all(
        torch.allclose(x[k]["features"], y[k]["features"], atol=1e-5) for k in x
    )


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="features-", dir="/tmp") as tmp:
        root = Path(tmp)
        config = make_job(root, args)
        if args.command == "classify":
            print(
                f"classify feature pass: {args.backbone} (weights {args.weights}) at "
                f"{args.input_size} px, real-real's shards of {args.patients} demo patients "
                f"x 2 x {args.per_class}"
            )
        else:
            print(
                f"fidelity feature pass: {', '.join(args.extractors)} and the channel "
                f"statistics, every pool of {args.patients} demo patients x 2 x "
                f"{args.per_class} and 48 synthetic images"
            )
        print(machine_line())
        results, caches = [], []
        for setting in args.settings:
            cache = root / f"local-{setting.replace(':', 'x')}"
            r = launch(setting, config, cache)
            results.append(r)
            caches.append(cache)
            print(
                f"{r['label']}: {r['pass_img_s']:7.1f} img/s in the pass, "
                f"{r['wall_img_s']:7.1f} with start-up ({r['images']} images, {r['wall_s']:.1f} s)",
                flush=True,
            )
        print_scaling(results, "in the pass")
        if args.slurm_tasks:
            if os.geteuid() != 0:
                sys.exit("the local Slurm cluster runs as root: run as root or --slurm-tasks")
            arrays = run_arrays(args.slurm_tasks, config, root)
            for a, cache in arrays:
                caches.append(cache)
                print(
                    f"{a['tasks']} array task(s), 1 CPU each: {a['img_s']:7.1f} img/s over the "
                    f"span of {a['span_s']:.0f} s, start-up included ({a['images']} images)"
                )
            first = next((a for a, _ in arrays if a["tasks"] == 1), None)
            for a, _ in arrays:
                if first and a["tasks"] > 1:
                    efficiency = a["img_s"] / (a["tasks"] * first["img_s"])
                    print(f"scaling efficiency at {a['tasks']} array tasks: {efficiency:.2f}")
        print(f"every cache equals the first: {all(same_cache(caches[0], c) for c in caches)}")


if __name__ == "__main__":
    main()
