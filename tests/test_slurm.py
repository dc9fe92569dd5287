"""The sbatch scripts under a real Slurm: a one-node cluster on localhost (tests/slurm_cluster.py).

The scripts' #SBATCH lines ask for GPUs, 8-16 CPUs and 32 GB; the tests override them on the
sbatch command line (a CPU-only node with 2 cores), as a user does for their cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from synthbreast.data.shards import load_manifest, verify_shards
from synthbreast.fileio import sha256_file
from synthbreast.train.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CPU_ONLY = ("--cpus-per-task=1", "--mem=1G")
# tiny budget, a tick and a checkpoint every 2 steps of 8 images; 50 steps: the signal lands
# mid-run
TRAIN_FLAGS = (
    "--budget tiny --tick-kimg 0.016 --checkpoint-kimg 0.016 --snapshot-kimg 0.4 --workers 0"
)
TRAIN_KIMG, TRAIN_STEPS = "0.4", 50


def local_cli(*args: str) -> list[str]:
    """The installed package, run here rather than under Slurm."""
    return [sys.executable, "-m", "synthbreast", *args]


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_array_tasks_all_run_and_a_dependency_waits_for_its_parent(slurm_cluster, tmp_path):
    cluster = slurm_cluster
    array = cluster.sbatch(
        "--array=0-3",
        f"--output={tmp_path}/array-%A_%a.out",
        "--wrap",
        "sleep 1; date +%s.%N > end-$SLURM_ARRAY_TASK_ID",
        cwd=tmp_path,
    )
    after = cluster.sbatch(
        f"--dependency=afterok:{array}", "--wrap", "date +%s.%N > after", cwd=tmp_path
    )
    # a dependency on a failed job is never satisfied
    failing = cluster.sbatch("--wrap", "exit 3", cwd=tmp_path)
    never = cluster.sbatch(f"--dependency=afterok:{failing}", "--wrap", "touch never", cwd=tmp_path)

    tasks = cluster.wait(array, timeout=60)
    assert sorted(int(t["ArrayTaskId"]) for t in tasks) == [0, 1, 2, 3]
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), tasks
    (record,) = cluster.wait(after, timeout=60)
    assert record["JobState"] == "COMPLETED", record
    ends = [float((tmp_path / f"end-{i}").read_text()) for i in range(4)]
    assert float((tmp_path / "after").read_text()) >= max(ends), "ran before its parent ended"

    (failed,) = cluster.wait(failing, timeout=60)
    assert (failed["JobState"], failed["ExitCode"]) == ("FAILED", "3:0")
    cluster.wait_for(
        lambda: cluster.jobs(never)[0]["Reason"] == "DependencyNeverSatisfied", 30, "reason"
    )
    cluster.run_command("scancel", never)
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def tiny_run(demo_shards, tmp_path_factory) -> Path:
    """A GAN run folder trained for 2 steps with the tiny budget, by the CLI."""
    outdir = tmp_path_factory.mktemp("gan")
    args = local_cli("train-gan", str(demo_shards), "--outdir", str(outdir), "--class", "1")
    args += ["--kimg", "0.016", *TRAIN_FLAGS.split()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = outdir.iterdir()
    return run_dir


def test_generate_array_job_equals_a_local_run(slurm_cluster, tiny_run, tmp_path):
    cluster = slurm_cluster
    job = {"CHECKPOINT": str(tiny_run), "SHARDS": "6", "PER_SHARD": "4", "SEED": "3"}
    array = cluster.sbatch(
        "--array=0-2",
        "--gres=none",
        *CPU_ONLY,
        f"--output={tmp_path}/gen-%A_%a.out",
        str(REPO / "slurm" / "generate.sh"),
        env={**job, "OUT": str(tmp_path / "slurm")},
        cwd=tmp_path,
    )
    local_job = [
        "--shards",
        "6",
        "--per-shard",
        "4",
        "--seed",
        "3",
        "--out",
        str(tmp_path / "local"),
    ]
    local = subprocess.run(
        local_cli("generate", "--checkpoint", str(tiny_run), *local_job),
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=300,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    tasks = cluster.wait(array, timeout=180)
    logs = "\n".join(read(p) for p in sorted(tmp_path.glob("gen-*.out")))
    assert all(t["JobState"] == "COMPLETED" for t in tasks), f"{tasks}\n{logs}"

    manifest = load_manifest(tmp_path / "slurm")
    assert manifest["status"] == "complete", logs
    assert verify_shards(tmp_path / "slurm", manifest) == []
    names = [f"synthetic-{i:06d}.tar" for i in range(6)]
    assert [s["name"] for s in manifest["shards"]] == names
    # task k of 3 made the contiguous block [2k, 2k+2)
    assert [s["made_by"]["slurm_array_task"] for s in manifest["shards"]] == [0, 0, 1, 1, 2, 2]
    for name in names:
        assert sha256_file(tmp_path / "slurm" / name) == sha256_file(tmp_path / "local" / name)


def test_train_gan_preempted_requeues_and_ends_as_an_uninterrupted_run(
    slurm_cluster, demo_shards, tmp_path
):
    cluster = slurm_cluster
    flags = f"{TRAIN_FLAGS} --kimg {TRAIN_KIMG}"
    # the same training locally, uninterrupted, meanwhile (one thread each: same arithmetic)
    env = {**cluster.env, "OMP_NUM_THREADS": "1"}
    local_outdir = ["--outdir", str(tmp_path / "local")]
    local = subprocess.Popen(
        local_cli("train-gan", str(demo_shards), *local_outdir, "--class", "0", *flags.split()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log = tmp_path / "train.out"
    job = cluster.sbatch(
        "--gpus-per-node=0",
        *CPU_ONLY,
        f"--output={log}",
        str(REPO / "slurm" / "train_gan.sh"),
        env={
            "OMP_NUM_THREADS": "1",
            "SHARDS": str(demo_shards),
            "CLASS": "0",
            "OUTDIR": str(tmp_path / "slurm"),
            "EXTRA": flags,
        },
        cwd=tmp_path,
    )
    # preempt it once it has written a checkpoint, as Slurm does before a time limit
    cluster.wait_for(
        lambda: list((tmp_path / "slurm").glob("*/checkpoints/*.json")), 120, "a checkpoint"
    )
    cluster.run_command("scancel", "--signal=USR1", "--batch", job)
    cluster.wait_for(lambda: int(cluster.jobs(job)[0]["Restarts"]) >= 1, 60, "the requeue")
    (record,) = cluster.wait(job, timeout=180)
    text = read(log)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == (
        "COMPLETED",
        "0:0",
        "1",
    ), f"{record}\n{text}"

    # the signal reached the trainer, which saved its state at that step; the requeued job
    # went on from there
    stopped = re.search(r"stopped by SIGTERM at step (\d+): checkpoint saved", text)
    assert stopped, text
    assert int(stopped[1]) < TRAIN_STEPS, "the run finished before the signal"
    assert f"requeueing job {job}" in text
    resumed = re.search(r"resumed from \S+ckpt-0*(\d+)\.json at step (\d+)", text)
    assert resumed and resumed[1] == resumed[2] == stopped[1], text

    _, err = local.communicate(timeout=300)
    assert local.returncode == 0, err[-3000:]
    (run_local,) = (tmp_path / "local").iterdir()
    (run_slurm,) = (tmp_path / "slurm").iterdir()  # the requeued job kept the same run folder
    a, b = load_checkpoint(run_local)["state"], load_checkpoint(run_slurm)["state"]
    assert a["step"] == b["step"] == TRAIN_STEPS
    for net in ("G", "D", "G_ema"):
        assert a[net].keys() == b[net].keys()
        for name, tensor in a[net].items():
            assert torch.equal(tensor, b[net][name]), f"{net}.{name} differs after the requeue"
    ticks_local, ticks_slurm = (
        [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
        for run in (run_local, run_slurm)
    )
    assert [t["step"] for t in ticks_slurm] == [t["step"] for t in ticks_local]
    assert [t["d_loss"] for t in ticks_slurm] == [t["d_loss"] for t in ticks_local]


def test_submit_train_singan_then_generate_singan_after_it(slurm_cluster, demo_shards, tmp_path):
    """`submit train-singan`: one array task per model (--task-id from the array index);
    `submit generate-singan --after` it: an array over the shards, started once every model
    is complete, with the bytes a local generate-singan makes from the same models."""
    cluster = slurm_cluster
    models, out = tmp_path / "models", tmp_path / "slurm"
    cpu = "--cpus-per-task=1 --mem=1G"

    def submit(*args: str) -> str:
        done = subprocess.run(local_cli("submit", *args), capture_output=True, text=True,
                              env=cluster.env, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip().split("job ")[-1]

    train = submit("train-singan", str(demo_shards), "--class", "1", "--images", "2",
                   "--outdir", str(models), "--budget", "tiny", "--max-size", "32",
                   "--iterations", "10", "--device", "cpu",
                   "--sbatch-args", f"--gpus=0 {cpu}")  # fmt: skip
    generate = ["--shards", "2", "--per-shard", "4"]
    gen = submit("generate-singan", str(models), "--out", str(out), *generate, "--after", train,
                 "--sbatch-args", cpu)  # fmt: skip

    tasks = cluster.wait(train, timeout=300)
    logs = "\n".join(read(p) for p in sorted((models / "logs").glob("*.out")))
    assert sorted(int(t["ArrayTaskId"]) for t in tasks) == [0, 1], f"{tasks}\n{logs}"
    assert all(t["JobState"] == "COMPLETED" for t in tasks), f"{tasks}\n{logs}"
    selection = json.loads((models / "selection.json").read_text())["images"]
    assert all((models / item["model_dir"] / "model.json").is_file() for item in selection)
    gen_tasks = cluster.wait(gen, timeout=300)
    logs = "\n".join(read(p) for p in sorted((models / "logs").glob("*.out")))
    assert all(t["JobState"] == "COMPLETED" for t in gen_tasks), f"{gen_tasks}\n{logs}"
    ended = max(datetime.fromisoformat(t["EndTime"]) for t in tasks)
    started = min(datetime.fromisoformat(t["StartTime"]) for t in gen_tasks)
    assert started >= ended, "generation started before every model was trained"

    manifest = load_manifest(out)
    assert manifest["status"] == "complete" and verify_shards(out, manifest) == []
    assert [s["made_by"]["slurm_array_task"] for s in manifest["shards"]] == [0, 1]
    local = subprocess.run(local_cli("generate-singan", str(models), "--out",
                                     str(tmp_path / "local"), *generate),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]
    for shard in manifest["shards"]:
        assert sha256_file(out / shard["name"]) == sha256_file(tmp_path / "local" / shard["name"])
    jobs = [json.loads(line) for line in (models / "jobs.jsonl").read_text().splitlines()]
    assert [(j["name"], j["stage"]) for j in jobs] == [
        ("train-singan", "train-singan"), ("generate-singan", "generate-singan"),
    ]  # fmt: skip
    # `status MODELS`: both arrays' tasks, and the outputs each stage reports (the models
    # folder as ".": the root)
    shown = subprocess.run(local_cli("status", str(models)), capture_output=True, text=True,
                           env={**cluster.env, "COLUMNS": "300"}, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = dict(re.findall(r"│ (\S+) +│ (.+?) +│", shown.stdout))
    assert rows.get(".") == rows.get(str(out)) == "complete", shown.stdout
    assert shown.stdout.count(":COMPLETED") == 4, "two tasks of each array"


def test_classify_feature_pass_array_fills_the_local_cache(slurm_cluster, demo_shards, tmp_path):
    """FEATURES_ONLY=1 slurm/classify.sh: 2 array tasks embed disjoint blocks of real-real's
    shards, and together make the cache one local process makes."""
    from synthbreast.config import ClassifyConfig, save_config
    from synthbreast.eval.classify import precompute_features
    from tests.test_features_split import cache_files

    def job(cache: Path) -> ClassifyConfig:
        return ClassifyConfig(
            out=str(tmp_path / "out"), real=str(demo_shards), scenario="real-real",
            weights="none", input_size="native", feature_cache=str(cache), features_only=True,
        )  # fmt: skip

    save_config(job(tmp_path / "slurm-cache"), tmp_path / "classify.json")
    array = slurm_cluster.sbatch(
        "--array=0-1", "--gres=none", *CPU_ONLY, f"--output={tmp_path}/features-%A_%a.out",
        str(REPO / "slurm" / "classify.sh"),
        env={"CONFIG": str(tmp_path / "classify.json"), "FEATURES_ONLY": "1"}, cwd=tmp_path,
    )  # fmt: skip
    local = precompute_features(job(tmp_path / "local-cache"), env={})
    tasks = slurm_cluster.wait(array, timeout=300)
    logs = "\n".join(read(p) for p in sorted(tmp_path.glob("features-*.out")))
    assert all(t["JobState"] == "COMPLETED" for t in tasks), f"{tasks}\n{logs}"
    done = re.findall(r"features \(array task \d, one process\): (\d+) of", logs)
    shares = [int(n) for n in done]
    assert len(shares) == 2 and all(shares) and sum(shares) == local["of_shards"], logs
    found, expected = cache_files(tmp_path / "slurm-cache"), cache_files(tmp_path / "local-cache")
    assert sorted(found) == sorted(expected) and len(expected) == local["of_shards"]
    for name, tensors in expected.items():
        torch.testing.assert_close(found[name]["features"], tensors["features"])
